"""LLMEngine and LLM: requests in, tokens (and text, when a tokenizer is attached) out.

    llm = LLM("path/to/model", max_num_seqs=32)
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))

Streaming: `add_request` / `step` / `abort` drive the engine from one thread; `stream` (an iterator) and `astream`
(an async generator) run a background loop thread that steps while there is work, so an HTTP server can submit and
cancel requests from other threads. add_request and abort only queue work (thread-safe); the next step applies it.
Bad input (empty prompt, too long, ids outside the vocabulary) raises ValueError for that request alone; in
`generate` it becomes that request's output with finish_reason "error".

Memory: `cache_memory` bytes hold the paged latent blocks and, for hybrid models with prefix caching, the KDA state
snapshots (1/8 of it); the live KDA states of max_num_seqs sequences come on top. `stats()` reports the exact use.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

import torch

from kimi.engine.block_manager import BlockManager
from kimi.engine.runner import ModelRunner
from kimi.engine.sampling_params import SamplingParams
from kimi.engine.scheduler import Scheduler
from kimi.engine.sequence import Sequence
from kimi.model.cost import kda_state_bytes_per_sequence
from kimi.model.model import Transformer


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    token_ids: list[int]
    text: str | None  # None without a tokenizer; while running, text that can no longer become a stop string
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "error"
    logprobs: list[dict] | None  # per token {"token", "logprob", "top": [(id, logprob)...]} when asked for


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None
    prompt: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict] | None:
        return self.outputs[0].logprobs

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    decoders: list = field(default_factory=list)
    subscriber: queue.Queue | _AsyncSink | None = None  # gets every RequestOutput of this request

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class _AsyncSink:
    """A subscriber the engine thread `put`s into and an asyncio task awaits (no executor thread per stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class LLMEngine:
    def __init__(self, model: str | Path | Transformer, *, tokenizer=None, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, block_size: int = 16, cache_memory: int | None = None,
                 enable_prefix_caching: bool = True, num_blocks: int | None = None, num_snapshots: int | None = None,
                 seed: int = 0, quantized: str = "keep", pack_weights: bool | None = None):
        """model: a model directory (its tokenizer is loaded when it has one) or a Transformer. dtype defaults to
        bfloat16 where the device computes it natively, else float32 (kimi/ops/dtypes.py); quantized ("keep" |
        "dequantize") says how FP8 / INT4 checkpoints run (kimi.load_model);
        num_blocks / num_snapshots override the sizes derived from cache_memory (tests, benchmarks).
        pack_weights: prepack bf16 CPU weights for oneDNN and, where kimi's C kernels build, keep the plain
        weights for their single-row products too (kimi/ops/packed_linear.py; ~2x faster batch-1 decode, twice
        the weight memory); for an fp32 model on a CPU, keep bf16 copies of its bf16-exact weights for single rows
        (kimi/ops/bf16_weights.py; with the fp32 one-row kernels ~2.5x faster batch-1 decode on an AVX2 CPU, 1.5x the
        weight memory). None packs a model the engine loads itself when that applies; True also packs a Transformer
        passed in, in place, making it inference-only."""
        from kimi.ops import packed_linear

        if isinstance(model, Transformer):
            if dtype is not None or device is not None:
                raise ValueError("dtype/device apply when loading a model directory; cast a Transformer yourself")
            self.model = model.eval()
        else:
            from kimi.model.loader import load_model
            from kimi.ops.dtypes import default_dtype

            device = torch.device(device or "cpu")
            self.model = load_model(model, dtype=dtype or default_dtype(device), device=device,
                                    quantized=quantized).eval()
            if tokenizer is None and (Path(model) / "tiktoken.model").is_file():
                from kimi.tokenizer.tokenizer import Tokenizer

                tokenizer = Tokenizer.from_pretrained(model)
            if pack_weights is None:
                pack_weights = packed_linear.supported(self.model.device, self.model.dtype)
        if pack_weights:
            packed_linear.pack_for_cpu(self.model)
        cfg = self.config = self.model.config
        self.tokenizer = tokenizer
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size = {block_size!r}: expected an int >= 1")
        max_model_len = max_model_len or cfg.max_position_embeddings
        hybrid_cache = cfg.is_hybrid and enable_prefix_caching
        elt = torch.finfo(self.model.dtype).bits // 8
        block_bytes = block_size * cfg.num_mla_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elt
        state_bytes = kda_state_bytes_per_sequence(cfg, elt)
        if cache_memory is None:
            cache_memory = 2 << 30 if self.model.device.type == "cpu" else int(torch.cuda.mem_get_info()[0] * 0.5)
        if num_blocks is None:
            want = max_num_seqs * -(-max_model_len // block_size)
            budget = cache_memory * (7 / 8 if hybrid_cache else 1)
            num_blocks = min(want, int(budget // block_bytes)) if block_bytes else want
        if num_snapshots is None:
            num_snapshots = min(4 * max_num_seqs, max(1, int(cache_memory / 8 // max(state_bytes, 1)))) \
                if hybrid_cache else 0
        if num_blocks * block_size < max_model_len:
            raise ValueError(f"the cache holds {num_blocks} blocks x {block_size} tokens = {num_blocks * block_size} "
                             f"tokens, fewer than max_model_len = {max_model_len}: raise cache_memory or lower "
                             "max_model_len")
        self.max_model_len = max_model_len
        self.runner = ModelRunner(self.model, num_blocks, block_size, max_num_seqs, num_snapshots)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.runner.states, max_num_seqs, max_num_batched_tokens,
                                   max_model_len)
        self.stop_ids = frozenset(cfg.eos_token_ids) | frozenset(tokenizer.stop_ids if tokenizer else ())
        self.requests: dict[str, _Request] = {}
        self._rng = random.Random(seed)
        self._ids = itertools.count()
        self._inbox: list[tuple[str, object]] = []
        self._inbox_lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._wake = threading.Event()
        self._loop: threading.Thread | None = None
        self._stopping = False
        # None, or a deque the engine appends one entry per forward to: (start, seconds of forward + sampling, CPU
        # seconds of this thread in them (all of its torch work with one intra-op thread), single-token rows,
        # prefill-chunk tokens). Benchmarks set one to compare the engine's step times with the latency clients see;
        # it is off by default so a long-running server holds nothing per step.
        self.step_log: deque[tuple[float, float, float, int, int]] | None = None

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, subscriber=None) -> str:
        """Validate and queue a request; returns its id. Raises ValueError (naming what is wrong) for bad input.
        subscriber: anything with put(RequestOutput) (a queue.Queue), called from the stepping thread."""
        req = self._make_request(prompt, params or SamplingParams(), request_id)
        req.subscriber = subscriber
        with self._inbox_lock:
            if req.request_id in self.requests or any(k == "add" and r.request_id == req.request_id
                                                      for k, r in self._inbox):
                raise ValueError(f"request id {req.request_id!r} is already in use")
            self._inbox.append(("add", req))
        self._wake.set()
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Abort a request: at the next step its blocks and state slots are freed and it finishes with "abort"."""
        with self._inbox_lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def _make_request(self, prompt, params: SamplingParams, request_id: str | None) -> _Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this engine has none (pass token ids)")
            text, prompt = prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a string or a list of token ids (ints)")
        if not prompt:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        V = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must lie in [0, {V}); got {bad[:5]}")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; max_model_len = {self.max_model_len} allows at most "
                             f"{self.max_model_len - 1} (one position is left for the output)")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = _Request(rid, text, list(prompt), params)
        share = self.blocks.enable_prefix_caching
        for i in range(params.n):
            gen = torch.Generator(device=self.model.device)
            if params.seed is None:
                gen.manual_seed(self._rng.getrandbits(63))
            else:
                gen.manual_seed(params.seed if i == 0 else hash((params.seed, i)) & (2 ** 63 - 1))
            parent = req.seqs[0] if i and share else None
            req.seqs.append(Sequence(rid, i, req.prompt_ids, params, gen, wait_for=parent))
            req.texts.append("")
            if self.tokenizer is not None:
                skip = self.tokenizer.id_to_special if params.skip_special_tokens else ()
                req.decoders.append(self.tokenizer.stream_decoder(skip))
        return req

    def has_unfinished_requests(self) -> bool:
        with self._inbox_lock:
            return bool(self._inbox) or bool(self.requests)

    # ---- one step --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Apply queued adds/aborts, run one scheduled forward, sample; outputs of every request that changed."""
        with self._step_lock:
            changed: dict[str, _Request] = {}
            with self._inbox_lock:
                inbox, self._inbox = self._inbox, []
            for kind, item in inbox:
                if kind == "add":
                    self.requests[item.request_id] = item
                    for seq in item.seqs:
                        self.scheduler.add(seq)
                else:
                    req = self.requests.get(item)
                    if req is not None:
                        for seq in req.seqs:
                            self.scheduler.finish(seq, "abort")
                        changed[req.request_id] = req
            scheduled = self.scheduler.schedule()
            if scheduled:
                t0, cpu0 = time.perf_counter(), time.thread_time()
                seqs, logits = self.runner.run(scheduled)
                tokens, entries = self.runner.sample(seqs, logits, self.stop_ids)
                if self.step_log is not None:
                    chunks = [n for _, n in scheduled if n > 1]
                    self.step_log.append((t0, time.perf_counter() - t0, time.thread_time() - cpu0,
                                          len(scheduled) - len(chunks), sum(chunks)))
                for seq, entry in zip(seqs, entries):
                    if entry is not None:
                        seq.logprobs.append(entry)
                grew = self.scheduler.postprocess(scheduled, {s.seq_id: t for s, t in zip(seqs, tokens)},
                                                  self.stop_ids)
                for seq in grew:
                    req = self.requests[seq.request_id]
                    self._detokenize(req, seq)
                    changed[req.request_id] = req
            outs = []
            for req in changed.values():
                out = self._output(req)
                outs.append(out)
                if req.subscriber is not None:
                    req.subscriber.put(out)
                if req.finished:
                    del self.requests[req.request_id]
            return outs

    def _detokenize(self, req: _Request, seq: Sequence) -> None:
        """Extend the text; finish on a stop string (matched across token boundaries, cut from the text)."""
        if self.tokenizer is None:
            return
        i = seq.index
        before = len(req.texts[i])
        req.texts[i] += req.decoders[i].push(seq.token_ids[-1])
        if seq.finished:
            req.texts[i] += req.decoders[i].flush()
        stops = req.params.stop
        if stops and seq.num_output_tokens >= req.params.min_tokens:
            text = req.texts[i]
            lo = max(0, before - max(map(len, stops)) + 1)
            hits = [j for j in (text.find(s, lo) for s in stops) if j >= 0]
            if hits:
                req.texts[i] = text[:min(hits)]
                if seq.finished:
                    seq.finish_reason = "stop"
                else:
                    self.scheduler.finish(seq, "stop")

    def _output(self, req: _Request) -> RequestOutput:
        hold = max(map(len, req.params.stop), default=1) - 1
        outs = []
        for seq, text in zip(req.seqs, req.texts):
            if self.tokenizer is None:
                text = None
            elif not seq.finished and hold:
                text = text[:max(0, len(text) - hold)]
            outs.append(CompletionOutput(seq.index, seq.output_ids, text, seq.finish_reason,
                                         list(seq.logprobs) if req.params.logprobs is not None else None))
        return RequestOutput(req.request_id, req.prompt_ids, outs, req.finished, req.seqs[0].num_cached_tokens,
                             prompt=req.prompt)

    # ---- streaming ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background loop thread (idempotent): it steps whenever there is work."""
        if self._loop is not None and self._loop.is_alive():
            return
        self._stopping = False
        self._loop = threading.Thread(target=self._run_loop, name="kimi-engine", daemon=True)
        self._loop.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._loop is not None:
            self._loop.join()
            self._loop = None

    def _run_loop(self) -> None:
        while not self._stopping:
            if not self.has_unfinished_requests():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a failed step fails every request in flight, not the thread silently
                for req in list(self.requests.values()):
                    if req.subscriber is not None:
                        req.subscriber.put(e)
                raise

    def stream(self, prompt, params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that changes it, the last one finished. Closing the
        iterator early aborts the request."""
        q: queue.Queue = queue.Queue()
        rid = self.add_request(prompt, params, request_id=request_id, subscriber=q)
        self.start()
        done = False
        try:
            while not done:
                out = q.get()
                if isinstance(out, Exception):
                    raise out
                done = out.finished
                yield out
        finally:
            if not done:
                self.abort(rid)

    async def astream(self, prompt, params: SamplingParams | None = None,
                      request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The async form of `stream`, for an asyncio server; cancelling it aborts the request."""
        sink = _AsyncSink(asyncio.get_running_loop())
        rid = self.add_request(prompt, params, request_id=request_id, subscriber=sink)
        self.start()
        done = False
        try:
            while not done:
                out = await sink.queue.get()
                if isinstance(out, Exception):
                    raise out
                done = out.finished
                yield out
        finally:
            if not done:
                self.abort(rid)

    # ---- accounting -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        b, st, sch = self.blocks, self.runner.states, self.scheduler
        q = sch.prompt_tokens_queried
        return {
            "blocks_total": b.num_blocks, "blocks_used": b.num_used, "blocks_free": b.num_free,
            "blocks_cached": b.num_cached, "block_size": b.block_size,
            "block_bytes": self.runner.block_bytes(),
            "state_slots_total": st.num_slots, "state_slots_used": st.num_used, "state_slots_free": st.num_free,
            "state_slot_bytes": st.slot_bytes(),
            "snapshots_total": st.num_snapshots, "snapshots_used": len(st.snapshots),
            "prefix_cache_queried_tokens": q, "prefix_cache_hit_tokens": sch.prompt_tokens_hit,
            "prefix_cache_hit_rate": sch.prompt_tokens_hit / q if q else 0.0,
            "num_preemptions": sch.num_preemptions,
            "running": len(sch.running), "waiting": len(sch.waiting),
        }


class LLM(LLMEngine):
    """Offline use: generate for a list of prompts, outputs in prompt order."""

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts: expected one or one each")
        results: dict[str, RequestOutput] = {}
        order = []
        q: queue.Queue = queue.Queue()
        for prompt, p in zip(prompts, params):
            rid = f"gen-{next(self._ids)}"
            order.append(rid)
            try:
                self.add_request(prompt, p, request_id=rid, subscriber=q)
            except ValueError as e:
                ids = prompt if isinstance(prompt, list) else []
                results[rid] = RequestOutput(rid, ids, [CompletionOutput(0, [], None, "error", None)], True,
                                             error=str(e), prompt=prompt if isinstance(prompt, str) else None)
        pending = len(order) - len(results)
        background = self._loop is not None and self._loop.is_alive()
        while pending:
            if not background:
                self.step()
            while pending and (not q.empty() or background):
                out = q.get()
                if isinstance(out, Exception):
                    raise out
                if out.finished:
                    results[out.request_id] = out
                    pending -= 1
        return [results[r] for r in order]
