"""Worker processes with known counters for the stats tool tests.

Each worker is a real (spawned) process attached to the runtime.  It does a
known number of transactions of each kind, then reports ``("done", info)`` on
its control pipe and *stays attached* until the parent sends ``"exit"`` (or
kills it), so the tool sees it as a live attached process with final counters.
No sleep stands in for synchronisation: every hand-off is a pipe message, and
the parent releases a retry() only after observing that the worker sleeps.
"""
import os
import traceback

CHILD_WAIT = 120.0


def _main(ctl, fn, args):
    import shmstm

    rt = None
    try:
        rt = shmstm.open(*args[0])
        info = fn(rt, *args[1:])
        ctl.send(("done", dict(info or {}, pid=os.getpid())))
    except BaseException:
        ctl.send(("error", "pid %d:\n%s" % (os.getpid(), traceback.format_exc())))
        return
    try:
        if ctl.poll(CHILD_WAIT):
            ctl.recv()                       # "exit"
    except EOFError:
        pass
    finally:
        rt.close()


def run(ctl, fn_name, args):
    """Process target: ``fn_name`` names a function below."""
    _main(ctl, globals()[fn_name], args)


def counters(rt, n_commits, n_ro, n_user, n_retry, gate_pipe):
    """``n_commits`` writer commits, ``n_ro`` read-only commits, ``n_user``
    transactions that raise (user aborts), then ``n_retry`` blocking retries:
    round i blocks until the parent sets TVar "gate" to i (the parent does so
    only after seeing this process asleep), then commits read-only."""
    import shmstm

    own = rt.tvar("own:%d" % os.getpid(), 0)
    gate = rt.tvar("gate", 0)

    def inc():
        own.value = own.value + 1

    for _ in range(n_commits):
        shmstm.atomically(inc)
    for _ in range(n_ro):
        shmstm.atomically(lambda: own.value)

    class Boom(Exception):
        pass

    def boom():
        own.value                       # touch a TVar, so the attempt is real
        raise Boom()

    for _ in range(n_user):
        try:
            shmstm.atomically(boom)
        except Boom:
            pass
        else:
            raise AssertionError("the transaction did not raise")
    for i in range(1, n_retry + 1):
        gate_pipe.send(("blocking", i))

        def wait_gate(i=i):
            shmstm.check(gate.value >= i)
        shmstm.atomically(wait_gate)
    return {"own": own.value}


def victim(rt, rounds, peer, x=None):
    """``rounds`` transactions on TVar ``x`` (default: the TVar named "hot-x"),
    each forced to conflict once: the first attempt reads x, lets the spoiler
    commit a write to x, then writes x, so its commit fails validation (exactly
    one abort, reason "validate", charged to x); the re-run commits."""
    import shmstm

    x = rt.tvar("hot-x", 0) if x is None else x
    attempts = [0]
    for r in range(rounds):
        first = [True]

        def body():
            attempts[0] += 1
            v = x.value
            if first[0]:
                first[0] = False
                peer.send(r)                 # "I have read x"
                if not peer.poll(CHILD_WAIT) or peer.recv() != r:
                    raise RuntimeError("spoiler did not commit round %d" % r)
            x.value = v + 1
        shmstm.atomically(body)
    return {"attempts": attempts[0]}


def spoiler(rt, rounds, peer, x=None):
    """Commits one write to ``x`` ("hot-x") per round, between the victim's
    read and its commit."""
    import shmstm

    x = rt.tvar("hot-x", 0) if x is None else x
    for r in range(rounds):
        if not peer.poll(CHILD_WAIT) or peer.recv() != r:
            raise RuntimeError("victim out of step at round %d" % r)
        shmstm.atomically(lambda: x.set(x.value + 100))
        peer.send(r)
    return {}


def doomed(rt, n_commits):
    """A few commits, then it waits to be SIGKILLed."""
    import shmstm

    t = rt.tvar("doomed:%d" % os.getpid(), 0)
    for _ in range(n_commits):
        shmstm.atomically(lambda: t.set(t.value + 1))
    return {}


def spinner(rt, stop_pipe):
    """Until the parent says stop (for --watch), as fast as it can, batches of
    64 writer commits, 16 read-only commits and 8 user aborts (a body that
    raises), so every rate of --watch but retries and wake-ups is non-zero."""
    import shmstm

    t = rt.tvar("spin:%d" % os.getpid(), 0)

    class Boom(Exception):
        pass

    def boom():
        t.value                          # touch a TVar, so the attempt is real
        raise Boom()

    n = 0
    stop_pipe.send("started")
    while not stop_pipe.poll():
        for _ in range(64):
            shmstm.atomically(lambda: t.set(t.value + 1))
        for _ in range(16):
            shmstm.atomically(lambda: t.value)
        for _ in range(8):
            try:
                shmstm.atomically(boom)
            except Boom:
                pass
        n += 64
    stop_pipe.recv()
    return {"commits": n}
