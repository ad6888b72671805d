"""atomically_async: a transaction awaited from asyncio code never stalls the
event loop (regression: a blocking retry() on the loop's thread stopped every
other task until a commit woke it)."""
import asyncio
import threading
import time

import pytest

import shmstm


def test_a_transaction_that_does_not_block_runs_on_the_loop(runtime):
    tv = runtime.tvar("x", 1)

    async def main():
        return await shmstm.atomically_async(lambda: (tv.value + 1, threading.get_ident()))

    assert asyncio.run(main()) == (2, threading.get_ident())


def test_a_waiting_transaction_leaves_the_loop_running(runtime):
    """No stall, no lost wake-up: a consumer awaits an item that a thread puts
    0.3 s later; meanwhile a ticker task on the same loop keeps ticking every
    10 ms, and the consumer gets the item."""
    box = runtime.tvar("box", None)

    def take():
        v = box.value
        shmstm.check(v is not None)
        box.value = None
        return v

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.ensure_future(ticker())
        threading.Timer(0.3, lambda: box.set("item")).start()
        got = await shmstm.atomically_async(take)
        done.set()
        await t
        return got, ticks

    t0 = time.monotonic()
    got, ticks = asyncio.run(main())
    assert got == "item" and box.value is None
    assert ticks >= 10, "the loop stalled: %d ticks in %.2f s" % (ticks, time.monotonic() - t0)


def test_cancelling_a_waiting_transaction_abandons_it(runtime):
    """Cancelled while it waits: CancelledError, the transaction stops (its
    thread ends) and commits nothing, even once it could."""
    box = runtime.tvar("box", None)
    taken = runtime.tvar("taken", 0)

    def take():
        shmstm.check(box.value is not None)
        taken.value += 1

    async def main():
        task = asyncio.ensure_future(shmstm.atomically_async(take))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = {t.name for t in threading.enumerate()}
    asyncio.run(main())
    deadline = time.monotonic() + 5
    while any(t.name == "shmstm-atomically_async" for t in threading.enumerate()
              if t.name not in before):
        assert time.monotonic() < deadline, "the waiting thread did not end"
        time.sleep(0.01)
    box.value = "item"
    assert taken.value == 0


def test_errors_reach_the_awaiting_task(runtime):
    tv = runtime.tvar("y", 0)

    def fails():
        shmstm.check(tv.value > 0)
        raise ValueError("from the transaction")

    async def main():
        threading.Timer(0.1, lambda: tv.set(1)).start()
        await shmstm.atomically_async(fails)

    with pytest.raises(ValueError, match="from the transaction"):
        asyncio.run(main())


def test_a_timed_call_keeps_its_timeout_when_nested_or_awaited(runtime):
    """Regression: @atomic(timeout=0.3) called inside atomically() or awaited
    through atomically_async() waited forever (the nested call joined the
    outer transaction and its timeout was dropped)."""
    flag = runtime.tvar("flag", 0)
    f = shmstm.atomic(timeout=0.3)(lambda: shmstm.check(flag.value >= 100))
    for run in (f, lambda: shmstm.atomically(f),
                lambda: asyncio.run(shmstm.atomically_async(f))):
        t0 = time.monotonic()
        with pytest.raises(shmstm.RetryTimeout):
            run()
        assert 0.25 < time.monotonic() - t0 < 5


def test_a_nested_timeout_does_not_outlast_a_wake_up(runtime):
    """The nested call's deadline counts from its first retry in the
    transaction: re-runs after wake-ups do not restart it."""
    import threading

    flag = runtime.tvar("flag", 0)
    noise = runtime.tvar("noise", 0)
    f = shmstm.atomic(timeout=0.5)(lambda: (noise.value, shmstm.check(flag.value >= 100)))
    stop = threading.Event()

    def poke():                     # wakes the waiter every 50 ms
        while not stop.wait(0.05):
            noise.value += 1

    th = threading.Thread(target=poke)
    th.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(shmstm.RetryTimeout):
            shmstm.atomically(f)
        assert 0.45 < time.monotonic() - t0 < 5
    finally:
        stop.set()
        th.join()
