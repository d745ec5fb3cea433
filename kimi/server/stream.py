"""Pieces shared by the chat and completions handlers: stop-string hold-back, logprob shapes, SSE framing,
OpenAI error bodies, the per-request log line, and draining a request for a whole response.

The engine ends a request on a stop string and cuts it from its own text; the chat handler parses token ids
instead (so control tokens are seen exactly), and `StopFilter` applies the same cut to the reasoning + content it
streams, holding back the last len(longest stop) - 1 characters until they cannot start a stop string.
"""

from __future__ import annotations

import json
import logging

from pydantic import BaseModel

log = logging.getLogger("kimi.server")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "request_too_large", 503: "unavailable_error",
                500: "internal_server_error"}


class StopFilter:
    """Feed (kind, text) pieces in order; get back the pieces that are safe to show. The stop strings are searched
    in the concatenation of every piece; the first match and everything after it are dropped."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1
        self.text = ""  # every character pushed so far (up to a match)
        self.shown = 0  # characters of self.text already released
        self.pending: list[list] = []  # [kind, text] not yet released, in order
        self.stopped = False

    def push(self, kind: str, text: str) -> list[tuple[str, str]]:
        if self.stopped or not text:
            return []
        if not self.stops:
            return [(kind, text)]
        start = max(0, len(self.text) - self.hold)
        self.text += text
        self.pending.append([kind, text])
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            return self._release(len(self.text))
        return self._release(len(self.text) - self.hold)

    def flush(self) -> list[tuple[str, str]]:
        return self._release(len(self.text))

    def _release(self, upto: int) -> list[tuple[str, str]]:
        out = []
        while self.pending and self.shown < upto:
            kind, text = self.pending[0]
            take = text[:upto - self.shown]
            if len(take) == len(text):
                self.pending.pop(0)
            else:
                self.pending[0][1] = text[len(take):]
            self.shown += len(take)
            if take:
                out.append((kind, take))
        if self.stopped:
            self.pending.clear()
        return out


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, entries: list[dict]) -> list[dict]:
    """Engine logprob entries -> OpenAI chat `logprobs.content` items."""
    out = []
    for e in entries:
        text, raw = token_text(tokenizer, e["token"])
        top = []
        for tid, lp in e["top"]:
            t, b = token_text(tokenizer, tid)
            top.append({"token": t, "logprob": _finite(lp), "bytes": b})
        out.append({"token": text, "logprob": _finite(e["logprob"]), "bytes": raw, "top_logprobs": top})
    return out


def _finite(x: float) -> float:
    return max(float(x), -9999.0)  # JSON has no -inf; OpenAI reports -9999.0 for impossible tokens


def sse(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude_none=True)
    else:
        body = json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


def log_request(state, endpoint: str, rid: str, prompt: int, completion: int, cached: int,
                ttft: float | None, total: float, finish: str) -> None:
    state.metrics.request_done(endpoint, finish, prompt, completion, cached, ttft, total)
    log.info("%s prompt=%d completion=%d cached=%d ttft=%s total=%.3fs finish=%s", rid, prompt, completion, cached,
             f"{ttft:.3f}s" if ttft is not None else "-", total, finish)


async def wait_all(sub, request, on_update) -> None:
    """Drain a submission for a whole (non-streaming) response; abort it if the client disconnects."""
    try:
        while sub.pending:
            item = await sub.next(0.5)
            if item is None:
                if request is not None and await request.is_disconnected():
                    sub.abort()
                    return
                continue
            on_update(*item)
    finally:
        sub.abort()
