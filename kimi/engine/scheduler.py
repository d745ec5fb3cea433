"""Scheduler: which sequences compute how many tokens in the next step (vLLM v1's token-budget rule).

Every sequence has `num_computed_tokens` and a target (all its tokens); a step hands out a budget of
max_num_batched_tokens, first to RUNNING sequences in arrival order (a decode costs 1 token, an unfinished prefill
a chunk of what is left), then to WAITING ones, which are admitted with whatever the prefix cache already holds.
That one rule gives continuous batching (sequences join and leave every step) and chunked prefill.
When a running sequence needs a block and none is free, the most recently admitted running sequence is preempted:
its blocks and state slot are released and it goes back to the front of the queue, to be recomputed (its full
blocks usually stay cached, so the recompute is mostly prefix hits). Design and the bugs others shipped:
../shared/reference/serving.md §3.2, §3.3, §6.

Hybrid models with prefix caching: a cached prefix is usable only up to a block boundary holding a KDA snapshot, so
chunks are cut to end on block boundaries (except a sequence's very last chunk), and the last boundary before a
sequence's final token is always a cut, so every prompt leaves a snapshot a later request can resume from.
"""

from __future__ import annotations

from collections import deque

from kimi.engine.block_manager import BlockManager
from kimi.engine.sequence import Sequence, SequenceStatus
from kimi.engine.state_pool import StatePool


class Scheduler:
    def __init__(self, blocks: BlockManager, states: StatePool, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("max_model_len", max_model_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} = {v!r}: expected an int >= 1")
        if max_num_seqs > states.num_slots:
            raise ValueError(f"max_num_seqs = {max_num_seqs} exceeds the {states.num_slots} state slots")
        self.blocks, self.states = blocks, states
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.snapshots = states.has_state and blocks.enable_prefix_caching and states.num_snapshots > 0
        if states.has_state and blocks.enable_prefix_caching:
            blocks.on_evict = states.drop_snapshot
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prompt_tokens_queried = 0  # prompt tokens of admitted sequences (first admission)
        self.prompt_tokens_hit = 0  # ... of which served from the prefix cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of tokens to compute this step)], sequences in a stable order."""
        budget = self.max_num_batched_tokens
        out: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, seq.num_computed_tokens, budget)
            while not self.blocks.grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                out.append((seq, n))
                budget -= n
                i += 1
                continue
            break
        if not preempted:  # admitting new work while evicting running work would only thrash
            self._admit(out, budget)
        return out

    def _admit(self, out: list, budget: int) -> None:
        blocked = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and self.states.num_free:
            seq = self.waiting[0]
            if seq.wait_for is not None and not seq.wait_for.prompt_done:
                blocked.append(self.waiting.popleft())  # a sibling is still computing the prompt it will reuse
                continue
            hits, hashes = self.blocks.match(seq.token_ids, seq.num_tokens - 1)  # always compute >= 1 token
            if self.states.has_state:  # a hit must end where a KDA snapshot of the state exists
                keep = 0
                if self.snapshots:
                    keep = next((j + 1 for j in range(len(hashes) - 1, -1, -1)
                                 if self.states.has_snapshot(hashes[j])), 0)
                hits, hashes = hits[:keep], hashes[:keep]
            cached = len(hits) * self.blocks.block_size
            n = self._chunk(seq, cached, budget)
            if not self.blocks.can_admit(hits, cached + n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, hits, hashes)
            assert self.blocks.grow(seq, cached + n)
            seq.state_slot = self.states.allocate()
            if hits and self.states.has_state:
                self.states.load_snapshot(hashes[-1], seq.state_slot)
            seq.num_computed_tokens = cached
            if not seq.admitted:
                seq.admitted = True
                seq.num_cached_tokens = cached
                self.prompt_tokens_queried += seq.num_prompt_tokens
                self.prompt_tokens_hit += cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(blocked))

    def _chunk(self, seq: Sequence, computed: int, budget: int) -> int:
        total = seq.num_tokens
        n = min(total - computed, budget)
        if not self.snapshots or n <= 1:
            return n
        bs, end = self.blocks.block_size, computed + n
        last = (total - 1) // bs * bs  # the last block boundary before the final token
        if computed < last < end:
            end = last
        elif end < total and end // bs * bs > computed:
            end = end // bs * bs
        return end - computed

    # ---- after the forward ---------------------------------------------------------------------------------
    def postprocess(self, scheduled: list[tuple[Sequence, int]], sampled: dict[int, int],
                    stop_ids: frozenset[int]) -> list[Sequence]:
        """Advance computed counts, register full blocks (and KDA snapshots), append sampled tokens (by seq_id),
        finish sequences on a stop id, max_tokens or max_model_len. Returns the sequences that got a token."""
        grew = []
        bs = self.blocks.block_size
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            self.blocks.commit(seq)
            c = seq.num_computed_tokens
            if self.snapshots and c % bs == 0 and len(seq.block_hashes) >= c // bs:
                self.states.save_snapshot(seq.state_slot, seq.block_hashes[c // bs - 1])
            token = sampled.get(seq.seq_id)
            if token is None:
                continue
            seq.token_ids.append(token)
            grew.append(seq)
            p = seq.params
            if (token in p.stop_token_ids or (not p.ignore_eos and token in stop_ids)) \
                    and seq.num_output_tokens > p.min_tokens:
                self.finish(seq, "stop")
            elif p.guide is not None and p.guide.is_finished():
                self.finish(seq, "stop")
            elif (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) \
                    or seq.num_tokens >= self.max_model_len:
                self.finish(seq, "length")
        return grew

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) seq wherever it is, releasing its blocks and state slot at once."""
        if seq.finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        if seq.state_slot >= 0:
            self.states.free(seq.state_slot)
            seq.state_slot = -1
