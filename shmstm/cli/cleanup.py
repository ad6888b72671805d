"""shmstm-cleanup: list shmstm segments on this machine and remove the stale ones.

    shmstm-cleanup [--dry-run] [--json] [NAME ...]

A segment is stale when no live process uses it: no process slot owned by a live
process (the kernel's answer: pid and start time), no process mapping it, and no
durable commit that only its ring holds (open the runtime to flush those); a
temporary name left by a creator killed during initialisation is stale once its
creator is dead.  Another user's segments are listed, never opened or removed.
"""
import argparse
import json
import sys

from ..shm import segments as _segments
from ..shm.segments import cleanup_segments, list_segments


def _human(segs, removed, dry_run):
    rows = [("NAME", "SIZE", "LIVE/SLOTS", "STATE", "NOTE")]
    for d in segs:
        state = "stale" if d["stale"] else "in use"
        if d["name"] in removed:
            state = "would remove" if dry_run else "removed"
        note = d["error"] or ""
        if d["creating"]:
            note = "initialising %s (creator pid %d %s) %s" % (
                d["creating"]["runtime"], d["creating"]["pid"],
                "alive" if d["creating"]["alive"] else "dead", note)
        elif d.get("unflushed"):
            note = "%d commit(s) not yet in LMDB: open the runtime to flush them %s" % (
                d["unflushed"], note)
        elif _segments.lock_note(d):
            note = "%s %s" % (_segments.lock_note(d), note)
        rows.append((d["name"], str(d["size"]), "%d/%d" % (d["live_processes"], len(d["processes"])),
                     state, note.strip()))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
                     for r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="shmstm-cleanup", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="only these runtimes (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="list what would be removed")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    before = list_segments()
    removed = cleanup_segments(dry_run=args.dry_run, names=args.names or None)
    segs = before           # as found: the removed ones are marked in the output
    if args.names:
        segs = [d for d in segs if d["name"] in args.names or
                (d.get("creating") and d["creating"]["runtime"] in args.names) or
                d["name"] in removed]
    if args.json:
        json.dump({"segments": segs, "removed": removed, "dry_run": args.dry_run},
                  sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(_human(segs, set(removed), args.dry_run))
        print("%s %d segment(s)" % ("would remove" if args.dry_run else "removed", len(removed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
