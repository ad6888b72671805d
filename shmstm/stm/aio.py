"""``atomically_async``: a transaction awaited from asyncio code.

A transaction that blocks in ``retry()`` blocks its thread; on an event
loop's thread that would stall every other task.  So the first attempt runs on
the loop's thread only as far as it does not block (a ``retry()`` there ends it
at once), and a transaction that must wait runs in a thread of its own, with
blocking attempts that wake on the commits that change what it read; the loop
awaits the outcome.
"""
import threading
import time
from typing import Any, Callable, TypeVar

from .tx import _PollExpired, _run_until

# How often a waiting transaction checks whether its task was cancelled
# (seconds): its wait is cut into waits this long, each a re-run.
CANCEL_POLL = 0.1

R = TypeVar("R")


async def atomically_async(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``await atomically_async(fn, *args, **kwargs)``: ``atomically`` for
    asyncio code, which never blocks the event loop.

    The transaction's first attempt runs on the loop's thread; if it would
    block in ``retry()``, the transaction runs in a new thread (which takes a
    process slot until it ends) and the loop awaits its result.  Cancelling
    the awaiting task abandons a waiting transaction within ``CANCEL_POLL``
    seconds (a commit that happened first stands).  Like ``atomically``, the
    function must have no side effects outside TVars; it may run on either
    thread."""
    # Imported here, not with the package: most programs never use asyncio.
    import asyncio

    timed = {}                          # nested timed calls' deadlines, kept across runs
    try:
        return _run_until(fn, args, kwargs, time.monotonic(), timed)    # never waits
    except _PollExpired:
        pass
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    stop = threading.Event()

    def settle(ok, value):
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def report(ok, value):
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:            # the loop was closed meanwhile: nobody awaits
            pass

    def wait_in_thread():
        while not stop.is_set():
            try:
                result = _run_until(fn, args, kwargs, time.monotonic() + CANCEL_POLL, timed)
            except _PollExpired:
                continue
            except BaseException as e:  # noqa: B902 - handed to the awaiting task
                report(False, e)
                return
            report(True, result)
            return

    threading.Thread(target=wait_in_thread, name="shmstm-atomically_async", daemon=True).start()
    try:
        return await fut
    except asyncio.CancelledError:
        stop.set()
        raise
