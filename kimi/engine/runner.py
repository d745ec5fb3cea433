"""ModelRunner: owns the model and the cache tensors; turns a scheduled step into one forward and samples.

Per step it flattens the scheduled tokens, computes positions and the cache row of every token (slot mapping) from
the block tables, the context rows of single-token queries, the KDA state slots, and the rows whose logits are
needed (a sequence's last scheduled token when that completes it), then calls Transformer.forward once with a
StepContext (context.py) and samples those rows (kimi/ops/sampling.py). Everything per token is tensor work;
Python loops run over sequences, never over tokens or layers.
"""

from __future__ import annotations

import torch

from kimi.engine.context import Chunk, DecodeBatch, StepContext
from kimi.engine.sequence import Sequence
from kimi.engine.state_pool import StatePool
from kimi.model.model import Transformer
from kimi.ops import sampling
from kimi.ops.attention import context_rows, contiguous, kernel_attends
from kimi.ops.one_token import OneTokenDecoder

# Single-token queries are attended DECODE_GROUP at a time, grouped by context length, where attention gathers each
# group's contexts padded to its longest (torch's path): one group of 64 mixed lengths would gather ~1.6x the rows
# that 4 sorted groups do. Where the C kernel reads each context in place (attention.kernel_attends), all go as one.
DECODE_GROUP = 16


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, num_state_slots: int,
                 num_snapshots: int):
        cfg = model.config
        self.model, self.config, self.device = model, cfg, model.device
        self.block_size, self.num_blocks = block_size, num_blocks
        mla_layers = [i for i, kind in enumerate(cfg.layer_types) if kind == "mla"]
        self.mla_row = {layer: r for r, layer in enumerate(mla_layers)}
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        # the paged latent cache: [MLA layers, num_blocks * block_size rows, kv_lora_rank + rope]
        self.kv_cache = torch.zeros(len(mla_layers), num_blocks * block_size, width, dtype=model.dtype,
                                    device=self.device)
        self.states = StatePool(cfg, num_state_slots, num_snapshots, model.dtype, self.device)
        # where a decode batch's contexts are gathered, every MLA layer of every step: grown to the largest batch
        # seen (B * longest context rows), never shrunk
        self.gather_buffer = torch.empty(0, width, dtype=model.dtype, device=self.device)
        # batch-1 decode as one flat program of C calls, where the packed model allows (kimi/ops/one_token.py)
        self.one_token = OneTokenDecoder.build(model, self.kv_cache, self.mla_row, self.states)

    def block_bytes(self) -> int:
        return self.kv_cache[:, :self.block_size].numel() * self.kv_cache.element_size()

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """One forward over the scheduled tokens -> (sequences to sample, their logits [M, vocab] fp32)."""
        dev, bs = self.device, self.block_size
        ids: list[int] = []
        starts, counts, tables, sample_rows, to_sample = [], [], [], [], []
        for seq, n in scheduled:
            c = seq.num_computed_tokens
            ids.extend(seq.token_ids[c:c + n])
            starts.append(c)
            counts.append(n)
            tables.append(seq.block_table)
            if c + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                to_sample.append(seq)
        N, S = len(ids), len(scheduled)
        if N == 1 and self.one_token is not None:  # one sequence, one token: the flat program, same logits
            seq, c, table = scheduled[0][0], starts[0], tables[0]
            rows = contiguous(table, c + 1, bs)
            logits = self.one_token(ids[0], c, table[c // bs] * bs + c % bs,
                                    context_rows([table], [c + 1], bs, dev)[0] if rows is None else rows,
                                    seq.state_slot)
            return to_sample, logits if to_sample else torch.empty(0, self.config.vocab_size)
        single = [i for i, n in enumerate(counts) if n == 1]
        decode_only = len(single) == S
        if decode_only:  # a token per sequence: its position and cache row straight from the lists (batch-1 decode
            # spent ~0.1 ms a step in the general path's dozen small tensor ops)
            positions = torch.tensor(starts, device=dev)
            slot_mapping = torch.tensor([t[c // bs] * bs + c % bs for t, c in zip(tables, starts)], device=dev)
            first = torch.arange(S, device=dev)
        else:
            t_counts = torch.tensor(counts, device=dev)
            seq_of = torch.repeat_interleave(torch.arange(S, device=dev), t_counts)  # [N] sequence of each token
            first = torch.cumsum(t_counts, 0) - t_counts
            positions = torch.tensor(starts, device=dev)[seq_of] + torch.arange(N, device=dev) - first[seq_of]
            width = max(len(t) for t in tables)
            bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev)  # [S, width]
            slot_mapping = bt[seq_of, positions // bs] * bs + positions % bs
        state_slots = torch.tensor([seq.state_slot for seq, _ in scheduled], dtype=torch.long, device=dev)
        decode = []
        size = DECODE_GROUP
        if single and kernel_attends(self.kv_cache, max(starts[i] for i in single) + 1):
            size = len(single)
        elif len(single) > DECODE_GROUP:  # shortest contexts first, so each group pads little (rows gathered ~ b*S)
            single.sort(key=lambda i: starts[i])
        for g in range(0, len(single), size):
            group = single[g:g + size]
            lengths = [starts[i] + 1 for i in group]
            span = contiguous(tables[group[0]], lengths[0], bs) if len(group) == 1 else None
            if span is not None:
                rows, mask = span, torch.ones(1, lengths[0], dtype=torch.bool, device=dev)
            else:
                rows, mask = context_rows([tables[i] for i in group], lengths, bs, dev)
                if rows.numel() > self.gather_buffer.shape[0]:
                    self.gather_buffer = self.gather_buffer.new_empty(rows.numel(), self.gather_buffer.shape[1])
            # one group holding every sequence of the step is the [B, 1] decode layout, in order (never sorted)
            decode.append(DecodeBatch(None if len(group) == S else first[group], rows, mask))
        chunks, offset = [], 0
        for i, n in enumerate(counts):
            if n > 1:
                c = starts[i]
                rows = None
                if c > 0:
                    rows = contiguous(tables[i], c + n, bs)
                    if rows is None:
                        rows = context_rows([tables[i]], [c + n], bs, dev)[0][0]
                chunks.append(Chunk(offset, offset + n, c, rows))
            offset += n

        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        if decode_only:
            input_ids, positions = input_ids[:, None], positions[:, None]
            cu_seqlens = None
        else:
            input_ids, positions = input_ids[None], positions[None]
            cu_seqlens = torch.cat([first, first.new_tensor([N])])
        ctx = StepContext(self.kv_cache, self.mla_row, self.states, slot_mapping, cu_seqlens, state_slots, decode,
                          chunks, self.gather_buffer)
        if not to_sample:
            self.model(input_ids, positions, ctx, logits_at=torch.zeros(0, dtype=torch.long, device=dev))
            return [], torch.empty(0, self.config.vocab_size)
        logits = self.model(input_ids, positions, ctx, logits_at=torch.tensor(sample_rows, device=dev))
        return to_sample, logits.float()

    @torch.inference_mode()
    def sample(self, seqs: list[Sequence], logits: torch.Tensor, stop_ids: frozenset[int]):
        """-> (token ids [M] as a list, per-row logprob entries or None)."""
        if not seqs:
            return [], []
        dev = logits.device
        params = [s.params for s in seqs]
        raw = logits
        if any(p.uses_penalties for p in params):
            logits = sampling.apply_penalties(
                logits, [s.token_ids[:s.num_prompt_tokens] for s in seqs], [s.output_ids for s in seqs],
                torch.tensor([p.repetition_penalty for p in params], device=dev),
                torch.tensor([p.presence_penalty for p in params], device=dev),
                torch.tensor([p.frequency_penalty for p in params], device=dev))
        for row, s in enumerate(seqs):
            banned = list(s.params.banned_token_ids)
            if s.num_output_tokens < s.params.min_tokens:  # no stop token before min_tokens
                banned += [*s.params.stop_token_ids, *(() if s.params.ignore_eos else stop_ids)]
            banned = [t for t in banned if t < logits.shape[1]]
            if banned:
                if logits is raw:
                    logits = logits.clone()
                logits[row, banned] = float("-inf")
        for row, p in enumerate(params):  # structured output: tokens the request's grammar forbids are never drawn
            allowed = p.guide.allowed_tokens() if p.guide is not None else None
            if allowed is not None:
                keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=dev)
                n = min(len(allowed), logits.shape[1])
                keep[:n] = allowed[:n].to(dev)
                if logits is raw:
                    logits = logits.clone()
                logits[row, ~keep] = float("-inf")
        tokens = sampling.sample(
            logits,
            torch.tensor([float(p.temperature) for p in params], device=dev),
            torch.tensor([p.top_k for p in params], device=dev),
            torch.tensor([float(p.top_p) for p in params], device=dev),
            torch.tensor([float(p.min_p) for p in params], device=dev),
            [None if p.greedy else s.generator for p, s in zip(params, seqs)])
        entries = [None] * len(seqs)
        want = [p.logprobs for p in params]
        if any(k is not None for k in want):
            k = max(k for k in want if k is not None)
            chosen, top_v, top_i = sampling.logprobs(raw, tokens, k)
            chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
            for row, kr in enumerate(want):
                if kr is not None:
                    entries[row] = {"token": int(tokens[row]), "logprob": chosen[row],
                                    "top": list(zip(top_i[row][:kr], top_v[row][:kr]))}
        tokens = tokens.tolist()
        for p, t in zip(params, tokens):
            if p.guide is not None:
                p.guide.accept(t)
        return tokens, entries
