"""The engine-thread -> event-loop bridge (kimi/server/async_engine.py) on a real event loop and a real thread."""

from __future__ import annotations

import asyncio
import threading

from kimi.server.async_engine import _Mailbox


def test_mailbox_delivers_a_steps_outputs_in_one_wake_and_in_order():
    loop = asyncio.new_event_loop()
    wakes = []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: (wakes.append(a), real(*a))[1]
    try:
        mailbox = _Mailbox(loop)
        queues = [asyncio.Queue() for _ in range(4)]

        def step():  # what the engine thread does after a step that changed 32 streams
            for i in range(32):
                mailbox.post(queues[i % 4], i)

        t = threading.Thread(target=step)
        t.start()
        t.join()
        loop.run_until_complete(asyncio.sleep(0))
        assert len(wakes) == 1
        for k, q in enumerate(queues):
            assert [q.get_nowait() for _ in range(q.qsize())] == list(range(k, 32, 4))
        mailbox.post(queues[0], "next step")  # delivered: the next post wakes the loop again
        loop.run_until_complete(asyncio.sleep(0))
        assert len(wakes) == 2 and queues[0].get_nowait() == "next step"
    finally:
        loop.close()
    mailbox.post(queues[0], "after close")  # a closed loop: dropped quietly (a server shutting down)
