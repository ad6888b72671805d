"""The STM front: transactions (tx), TVars (tvar), the Runtime users hold
(runtime) and atomically_async (aio)."""
