"""Sequence: one stream of tokens the engine computes (a request with n samples owns n of them).

It holds what the scheduler and the caches need: the tokens (prompt, then output), how many of them are in the
cache (`num_computed_tokens`), its block table (ids of paged latent blocks, in order) with the chained hashes of
its full computed blocks, its KDA state slot, and its sampling parameters and generator.
"""

from __future__ import annotations

import enum
import itertools

import torch

from kimi.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    _ids = itertools.count()

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 generator: torch.Generator, wait_for: "Sequence | None" = None):
        self.seq_id = next(Sequence._ids)
        self.request_id, self.index = request_id, index  # index: which of the request's n samples
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.generator = generator
        self.wait_for = wait_for  # a sibling whose prompt must be cached first (n > 1 shares it)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose latents / states are in this sequence's cache
        self.num_cached_tokens = 0  # of the prompt, served from the prefix cache at first admission
        self.admitted = False
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hash of block i, for the full blocks computed so far
        self.state_slot = -1
        self.finish_reason: str | None = None
        self.logprobs: list[dict] = []  # per output token: {"token": id, "logprob": x, "top": [(id, x), ...]}

    def __repr__(self):
        return (f"Sequence({self.seq_id}, {self.request_id}#{self.index}, {self.status.value}, "
                f"{self.num_computed_tokens}/{self.num_tokens} computed, {len(self.block_table)} blocks)")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def prompt_done(self) -> bool:
        """The prompt is in the cache (so siblings waiting on it can hit the prefix cache)."""
        return self.finished or self.num_computed_tokens >= self.num_prompt_tokens
