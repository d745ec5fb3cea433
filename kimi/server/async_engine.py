"""AsyncEngine: the bridge between the asyncio HTTP server and the engine's background step thread.

The engine thread publishes each request's RequestOutput to a subscriber after every step that changes it; here
the subscriber posts it to a mailbox that hands it to the request's asyncio queue on the server's loop, so no
executor thread waits per request (32 streams cost 32 queues, not 32 threads), and the outputs one step publishes
for many streams travel in one `call_soon_threadsafe`: the loop wakes once per step, not once per stream.
A request in flight is a `Submission`: async-iterate it for (choice offset, RequestOutput) pairs; `abort()` (called
when the client goes away) aborts whatever has not finished, and the engine frees its cache blocks and state slot at
its next step.

Admission is bounded: at most `max_num_seqs + max_waiting` sequences may be in flight; beyond that `Overloaded` is
raised and the server answers 503, so a burst queues in the client, not without bound in the server.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref

from kimi.engine.engine import LLMEngine, RequestOutput
from kimi.engine.sampling_params import SamplingParams


class Overloaded(Exception):
    pass


class _Mailbox:
    """Carries items from the engine thread onto one event loop. Whatever is posted before the loop gets round to
    delivering goes in the same delivery (every wake of the loop costs a pipe write and a GIL hand-over)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # weak: AsyncEngine keeps mailboxes in a dict keyed weakly by their loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, object]] = []

    def post(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:
                return  # a delivery is already scheduled and will take this item too
        loop = self._loop()
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop closed under a shutting-down server; nobody is listening any more
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class _Subscriber:
    """Quacks like queue.Queue.put for the engine thread; delivers into an asyncio queue on the server's loop."""

    def __init__(self, mailbox: _Mailbox, queue: asyncio.Queue, offset: int):
        self.mailbox, self.queue, self.offset = mailbox, queue, offset

    def put(self, item) -> None:
        self.mailbox.post(self.queue, (self.offset, item))


class Submission:
    def __init__(self, owner: "AsyncEngine", request_ids: list[str], queue: asyncio.Queue, num_seqs: int):
        self._owner, self._queue = owner, queue
        self.request_ids = request_ids
        self.pending = set(request_ids)
        self.num_seqs = num_seqs

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.pending:
            raise StopAsyncIteration
        offset, out = await self._queue.get()
        if isinstance(out, Exception):
            self.abort()
            raise RuntimeError(f"the engine failed: {out}") from out
        if out.finished:
            self.pending.discard(out.request_id)
            if not self.pending:
                self._owner._release(self)
        return offset, out

    async def next(self, timeout: float) -> tuple[int, RequestOutput] | None:
        """The next update, or None after `timeout` seconds without one (to poll for a client disconnect)."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except asyncio.TimeoutError:
            return None

    def abort(self) -> None:
        """Abort every unfinished part of the request (idempotent)."""
        for rid in self.pending:
            self._owner.engine.abort(rid)
        if self.pending:
            self.pending.clear()
            self._owner._release(self)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256):
        self.engine = engine
        self.max_in_flight = engine.scheduler.max_num_seqs + max_waiting
        self.in_flight = 0  # sequences admitted and not yet finished
        self._ids = itertools.count()
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its mailbox
        engine.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def submit(self, prompt_ids: list[int], params: list[SamplingParams], request_id: str) -> Submission:
        """Queue one engine request per SamplingParams (their outputs are numbered consecutively: the second's
        first output has offset params[0].n). Raises Overloaded, or ValueError for a request the engine refuses."""
        num_seqs = sum(p.n for p in params)
        if self.in_flight + num_seqs > self.max_in_flight:
            raise Overloaded(f"the server is at capacity ({self.in_flight} sequences in flight, at most "
                             f"{self.max_in_flight}); retry later")
        loop = asyncio.get_running_loop()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = _Mailbox(loop)
        queue: asyncio.Queue = asyncio.Queue()
        ids, offset = [], 0
        try:
            for i, p in enumerate(params):
                rid = f"{request_id}-{i}" if len(params) > 1 else request_id
                self.engine.add_request(prompt_ids, p, request_id=rid, subscriber=_Subscriber(mailbox, queue, offset))
                ids.append(rid)
                offset += p.n
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        self.in_flight += num_seqs
        return Submission(self, ids, queue, num_seqs)

    def _release(self, submission: Submission) -> None:
        self.in_flight -= submission.num_seqs

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()
