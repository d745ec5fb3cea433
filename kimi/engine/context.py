"""StepContext: the cache protocol of kimi/model/cache.py for one engine step, over the paged latent cache and the
KDA state pool. The runner builds one per step and passes it to Transformer.forward as `cache`.

Two layouts: a decode-only step runs as [B, 1] (rows are sequences, cu_seqlens None, so KDA takes its batched
single-token path); any other step packs all scheduled tokens as [1, N] with cu_seqlens. MLA layers first write the
step's latents into their cache rows (slot_mapping), then attend: the single-token queries in the absorbed form, a
group of similar context lengths at a time (DecodeBatch; the runner groups them so little of a gather is padding);
each multi-token chunk (a prefill) through MLA.attend, over just its own new latents when it starts at position 0,
else over its context read from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi.engine.state_pool import StatePool
from kimi.ops.attention import paged_decode


@dataclass
class DecodeBatch:
    """Single-token queries attended together: one padded [b, S] context gather, S = the longest context of the b."""
    tokens: torch.Tensor | None  # [b] which of the step's B*T tokens (None: all of them, in order: decode layout)
    rows: torch.Tensor | slice  # [b, S] cache rows of each context, or one slice (b = 1, consecutive blocks)
    mask: torch.Tensor  # [b, S] bool, True where rows hold a real context token


@dataclass
class Chunk:
    start: int  # first token of the chunk in the packed layout
    end: int
    position: int  # position of its first token in its sequence (0: nothing cached before it)
    rows: torch.Tensor | slice | None  # [position + length] cache rows of its whole context (None when position 0)


class StepContext:
    length = 0  # positions are always passed explicitly; the model never reads this

    def __init__(self, kv_cache: torch.Tensor, mla_row: dict[int, int], pool: StatePool, slot_mapping: torch.Tensor,
                 cu_seqlens: torch.Tensor | None, state_slots: torch.Tensor, decode: list[DecodeBatch],
                 chunks: list[Chunk], gather_buffer: torch.Tensor | None = None):
        self.kv_cache, self.mla_row, self.pool = kv_cache, mla_row, pool
        self.slot_mapping = slot_mapping  # [N] cache row of every token of the step
        self.cu_seqlens = cu_seqlens
        self.state_slots = state_slots  # [num sequences] live KDA slot of each, in step order
        self.decode, self.chunks = decode, chunks
        self.gather_buffer = gather_buffer  # [>= b*S, W] scratch for a decode group's contexts (ops/attention.py)

    def advance(self, num_tokens: int) -> None:
        pass  # the scheduler advances each sequence after the step

    def mla_attention(self, mla, q_nope, q_pe, latent) -> torch.Tensor:
        """q_nope [B, T, H, nope], q_pe [B, T, H, rope], latent [B, T, W] -> [B, T, H, v]."""
        B, T, _ = latent.shape
        cache = self.kv_cache[self.mla_row[mla.layer_idx]]  # [R, W]
        cache.index_copy_(0, self.slot_mapping, latent.reshape(B * T, -1))
        if len(self.decode) == 1 and self.decode[0].tokens is None:  # decode layout, one group: every row a query
            d = self.decode[0]
            return paged_decode(mla, q_nope, q_pe, cache, d.rows, d.mask, self.gather_buffer)
        out = q_nope.new_empty(B, T, mla.num_heads, mla.v_head_dim)
        flat = out.view(B * T, mla.num_heads, mla.v_head_dim)
        q_nope_flat, q_pe_flat = q_nope.reshape(B * T, 1, mla.num_heads, -1), q_pe.reshape(B * T, 1, mla.num_heads, -1)
        for d in self.decode:
            flat[d.tokens] = paged_decode(mla, q_nope_flat[d.tokens], q_pe_flat[d.tokens], cache, d.rows, d.mask,
                                          self.gather_buffer)[:, 0]
        for c in self.chunks:
            ctx = latent[:, c.start:c.end] if c.rows is None else cache[c.rows][None]
            out[:, c.start:c.end] = mla.attend(q_nope[:, c.start:c.end], q_pe[:, c.start:c.end], ctx, c.position)
        return out

    def kda_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.pool.row[layer]
        return self.pool.conv[r][self.state_slots], self.pool.state[r][self.state_slots]

    def kda_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pool's whole window and state tensors of this layer and each sequence's live slot, for in-place
        decode kernels (ops/packed_linear.py's OneRowKDA)."""
        r = self.pool.row[layer]
        return self.pool.conv[r], self.pool.state[r], self.state_slots

    def set_kda_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        r = self.pool.row[layer]
        self.pool.conv[r].index_copy_(0, self.state_slots, conv.to(self.pool.conv.dtype))
        self.pool.state[r].index_copy_(0, self.state_slots, state.float())
