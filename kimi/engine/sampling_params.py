"""SamplingParams: how one request is decoded (vLLM's field names and meanings; OpenAI's where they overlap).

Every field is checked when the object is made; a bad value raises ValueError naming the field and the allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    n: int = 1  # parallel samples of one prompt (they share the prompt's cached blocks)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 (or -1) = every token
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the top token's
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in the prompt or output (CTRL-style divide)
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever shares the batch
    max_tokens: int | None = 16  # None = until max_model_len
    min_tokens: int = 0  # stop tokens and stop strings are ignored before this many tokens
    stop: str | list[str] | tuple[str, ...] | None = None  # stop strings, matched on text, excluded from it
    stop_token_ids: list[int] | tuple[int, ...] | None = None  # extra stop ids (kept in token_ids)
    ignore_eos: bool = False  # keep going past the model's eos / the tokenizer's stop ids
    banned_token_ids: list[int] | tuple[int, ...] | None = None  # never sampled (e.g. tool-call openers under
    # tool_choice "none"); ids outside the vocabulary are ignored
    logprobs: int | None = None  # None = none; k >= 0: the sampled token's logprob plus the k most likely
    skip_special_tokens: bool = True  # leave special tokens out of the text
    # Constrained decoding (structured output): an object with allowed_tokens() -> bool [vocab] | None (called before
    # each token is sampled; False entries are never chosen), accept(token_id) (called with each sampled token) and
    # is_finished() -> bool (then the request finishes with "stop"). It follows one sequence, so n must be 1.
    guide: object | None = None

    def __post_init__(self):
        def bad(field, value, want):
            raise ValueError(f"SamplingParams.{field} = {value!r}: expected {want}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            bad("n", self.n, "an int >= 1")
        if not is_num(self.temperature) or not 0 <= self.temperature < float("inf"):
            bad("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "a number in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            bad("top_k", self.top_k, "an int >= 0 (0 or -1 = off)")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "a number in [0, 1]")
        if not is_num(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            bad("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                bad(name, v, "a number in [-2, 2]")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", self.seed, "an int or None")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", self.max_tokens, "an int >= 1 or None")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"at most max_tokens ({self.max_tokens})")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stop = tuple(stop)
        else:
            bad("stop", self.stop, "a string, a list of strings, or None")
        if any(s == "" for s in stop):
            bad("stop", self.stop, "non-empty strings")
        self.stop = stop
        for name in ("stop_token_ids", "banned_token_ids"):
            ids = getattr(self, name)
            ids = () if ids is None else ids
            if not isinstance(ids, (list, tuple)) or not all(is_int(i) and i >= 0 for i in ids):
                bad(name, getattr(self, name), "a list of non-negative ints")
            setattr(self, name, tuple(ids))
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", self.ignore_eos, "a bool")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            bad("logprobs", self.logprobs, "an int in [0, 20] or None")
        if self.guide is not None:
            if not all(callable(getattr(self.guide, m, None)) for m in ("allowed_tokens", "accept", "is_finished")):
                bad("guide", self.guide, "an object with allowed_tokens(), accept(token_id) and is_finished()")
            if self.n != 1:
                bad("n", self.n, "1 with a guide (a guide follows one sequence; make one request per sample)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
