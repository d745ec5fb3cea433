"""POST /v1/completions: raw text (or token ids) in, text out, OpenAI's legacy completions shape.

The prompt is encoded with control-token names allowed (a client that templated the prompt itself means them), the
engine's own text is returned (it cuts stop strings), `echo` puts the prompt in front, and `logprobs: k` gives the
legacy {tokens, token_logprobs, top_logprobs, text_offset} block. One prompt per request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from kimi.engine.sampling_params import SamplingParams
from kimi.server.serving_chat import _sampling_fields, context_check, usage
from kimi.server.stream import SSE_DONE, error_body, log, log_request, sse, token_text, wait_all


@dataclass
class CompletionPlan:
    prompt_ids: list[int]
    prompt_text: str
    params: SamplingParams
    echo: bool
    logprobs: int | None
    include_usage: bool


def plan_completion(req, tokenizer, max_model_len: int, defaults: dict) -> CompletionPlan:
    if isinstance(req.prompt, str):
        if not req.prompt:
            raise ValueError("prompt is empty: a completion needs at least one prompt token")
        ids = tokenizer.encode(req.prompt, allow_special=True)
        text = req.prompt
    else:
        if not req.prompt:
            raise ValueError("prompt is an empty list: a completion needs at least one prompt token")
        bad = [t for t in req.prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must lie in [0, {tokenizer.vocab_size}); got {bad[:5]}")
        ids, text = list(req.prompt), tokenizer.decode(req.prompt)
    if req.stream_options is not None and not req.stream:
        raise ValueError("stream_options is only allowed with stream: true")
    max_tokens = context_check(len(ids), req.max_tokens if req.max_tokens is not None else 16, max_model_len)
    params = SamplingParams(n=req.n, max_tokens=max_tokens, logprobs=req.logprobs, **_sampling_fields(req, defaults))
    return CompletionPlan(ids, text, params, req.echo, req.logprobs,
                          bool(req.stream_options and req.stream_options.include_usage))


def _legacy_logprobs(tokenizer, entries: list[dict], offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        text, _ = token_text(tokenizer, e["token"])
        tokens.append(text)
        lps.append(max(float(e["logprob"]), -9999.0))
        tops.append({token_text(tokenizer, t)[0]: max(float(v), -9999.0) for t, v in e["top"]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def completion_full(state, plan: CompletionPlan, sub, rid, model, t0, request) -> dict:
    tok = state.engine.tokenizer
    last: dict[int, object] = {}
    info = {"cached": 0, "ttft": None}

    def on_update(offset, out):
        info["cached"] = out.num_cached_tokens
        for o in out.outputs:
            if o.token_ids and info["ttft"] is None:
                info["ttft"] = time.perf_counter() - t0
            last[o.index] = o

    await wait_all(sub, request, on_update)
    choices = []
    prefix = plan.prompt_text if plan.echo else ""
    for i in range(plan.params.n):
        o = last.get(i)
        text = (o.text or "") if o is not None else ""
        lp = None
        if plan.logprobs is not None and o is not None:
            lp = _legacy_logprobs(tok, o.logprobs or [], len(prefix))
        choices.append({"index": i, "text": prefix + text, "logprobs": lp,
                        "finish_reason": o.finish_reason if o is not None else "abort"})
    n_out = sum(len(o.token_ids) for o in last.values())
    log_request(state, "completions", rid, len(plan.prompt_ids), n_out, info["cached"], info["ttft"],
                time.perf_counter() - t0, ",".join(sorted({c["finish_reason"] for c in choices})))
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(len(plan.prompt_ids), n_out, info["cached"])}


async def completion_stream(state, plan: CompletionPlan, sub, rid, model, t0):
    tok = state.engine.tokenizer
    created = int(time.time())
    n = plan.params.n
    sent_text, sent_lp, counts, finish = [""] * n, [0] * n, [0] * n, [None] * n
    cached, ttft, last, gaps = 0, None, None, []

    def chunk(i, text, lp=None, reason=None):
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}

    try:
        if plan.echo:
            for i in range(n):
                yield sse(chunk(i, plan.prompt_text))
        async for _, out in sub:
            cached = out.num_cached_tokens
            for o in out.outputs:
                i = o.index
                if len(o.token_ids) == counts[i] and (o.finish_reason is None or finish[i] is not None):
                    continue
                if len(o.token_ids) > counts[i]:
                    t = time.perf_counter()
                    if ttft is None:
                        ttft = t - t0
                    elif last is not None:
                        gaps.append(t - last)
                    last = t
                counts[i] = len(o.token_ids)
                text = o.text or ""
                delta, sent_text[i] = text[len(sent_text[i]):], text
                lp = None
                if plan.logprobs is not None and o.logprobs is not None:
                    lp = _legacy_logprobs(tok, o.logprobs[sent_lp[i]:], len(sent_text[i]) - len(delta))
                    sent_lp[i] = len(o.logprobs)
                if o.finish_reason is not None:
                    finish[i] = o.finish_reason
                # one event per step that produced tokens, even when their text is held back (an incomplete
                # UTF-8 sequence, a possible stop string): clients see the token cadence, as vLLM streams it
                yield sse(chunk(i, delta, lp, o.finish_reason))
        if plan.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": usage(len(plan.prompt_ids), sum(counts), cached)})
        yield SSE_DONE
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.exception("stream %s failed", rid)
        yield sse(error_body(500, f"internal server error: {type(e).__name__}"))
        yield SSE_DONE
    finally:
        sub.abort()
        state.metrics.token_gaps(gaps)
        log_request(state, "completions", rid, len(plan.prompt_ids), sum(counts), cached, ttft,
                    time.perf_counter() - t0, ",".join(sorted({f or "abort" for f in finish})))
