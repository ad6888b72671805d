"""Machine-wide CPU times from /proc/stat, for the benchmark tools.

On a virtual machine the hypervisor can run other guests on our vCPUs:
that time is "steal", and it skews every rate measured meanwhile, so the
tools report its share next to their numbers."""
import os


def cpu_times():
    """(busy, steal) CPU-seconds of the whole machine (all CPUs), or None.
    busy = user + nice + system + irq + softirq."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        # cpu  user nice system idle iowait irq softirq steal ...
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
        hz = os.sysconf("SC_CLK_TCK")
        return (user + nice + system + irq + softirq) / hz, steal / hz
    except (OSError, ValueError, IndexError):
        return None


class Steal:
    """The share of the vCPUs' time that the hypervisor took between
    construction and share() (0..1), or None where /proc/stat says nothing."""

    def __init__(self):
        import time
        self._time = time.monotonic
        self.t0 = self._time()
        self.c0 = cpu_times()

    def share(self):
        c1 = cpu_times()
        if self.c0 is None or c1 is None:
            return None
        cap = (self._time() - self.t0) * (os.cpu_count() or 1)
        return (c1[1] - self.c0[1]) / cap if cap > 0 else None


class DiskRequests:
    """Write and flush requests that the block device holding ``path``
    completed between construction and counts() (from
    /sys/dev/block/MAJ:MIN/stat), or None where the kernel does not say.
    On a virtual disk each request is a trip to the host, so the requests
    per operation say much of what a synchronous commit costs there."""

    def __init__(self, path):
        st = os.stat(path)
        dev = "/sys/dev/block/%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
        # The kernel counts flush requests on the whole disk only: for a
        # partition, read its disk's counters.
        if os.path.exists(os.path.join(dev, "partition")):
            dev = os.path.dirname(os.path.realpath(dev))
        self.file = os.path.join(dev, "stat")
        self.c0 = self._read()

    def write_back(self):
        """True if the device caches writes (so fsync sends it flushes)."""
        try:
            with open(os.path.join(os.path.dirname(self.file), "queue", "write_cache")) as f:
                return f.read().strip() == "write back"
        except OSError:
            return False

    def _read(self):
        try:
            with open(self.file) as f:
                v = [int(x) for x in f.read().split()]
            # writes completed: field 5; flushes completed: field 16 (Linux >= 5.5)
            return (v[4], v[15] if len(v) > 15 else None)
        except (OSError, ValueError, IndexError):
            return None

    def counts(self):
        c1 = self._read()
        if self.c0 is None or c1 is None:
            return None
        return (c1[0] - self.c0[0], None if c1[1] is None or self.c0[1] is None else c1[1] - self.c0[1])
