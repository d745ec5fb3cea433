"""Packed training rows: several documents share one [T] row, and no token sees or inherits state from another.

The loader (train/data.py) cuts the token stream into rows of T tokens and gives each token a document index
`doc_ids [B, T]` (non-decreasing along a row; a row may start inside a document). `packed_forward` runs the model
so that every document behaves as if it were run on its own:
  MLA: attention under a block-diagonal causal mask [B, 1, T, T] (per row: same document and not in the future);
       the layer's QK-Clip statistic is recorded under the same mask, so logits across documents never count.
  KDA: the batch is flattened to one [1, B*T] row with `cu_seqlens` at every document start and every row start,
       so the short conv and the recurrent state start from zero for each document (ops/kda.py's packed path).
  positions restart at 0 for every document (and at the start of every row).
When no row holds a document boundary the model runs as a plain [B, T] causal batch (SDPA's fast path, the
dense KDA layout): the same function, faster. The identity "packed rows = documents run one by one" is tested in
tests/test_data.py. The context implements the cache protocol of kimi/model/cache.py without storing anything.
"""

from __future__ import annotations

import torch


class Documents:
    """Cache-protocol context for one packed batch; built from doc_ids [B, T] (any integers, equal = same document,
    non-decreasing along each row)."""

    length = 0  # the protocol's "tokens already cached": nothing is cached here

    def __init__(self, doc_ids: torch.Tensor):
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [B, T], got shape {tuple(doc_ids.shape)}")
        B, T = doc_ids.shape
        self.rows, self.seq_len = B, T
        # first token of every document inside a row: a new document starts where the index changes or a row begins
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        self.trivial = bool(starts[:, 1:].logical_not().all())  # no row holds a boundary
        flat = starts.flatten()
        begin = flat.nonzero().flatten()  # [N] start offsets in the flattened B*T tokens
        self.cu_seqlens = torch.cat([begin, begin.new_tensor([B * T])])
        # positions: distance to the most recent document start (cummax over start offsets)
        idx = torch.arange(B * T, device=doc_ids.device)
        last_start = torch.where(flat, idx, torch.zeros_like(idx)).cummax(0).values
        self.positions = (idx - last_start).view(1, B * T)
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
        self.mask = (same & causal)[:, None]  # [B, 1, T, T]; True = may attend

    def mla_attention(self, mla, q_nope, q_pe, latent) -> torch.Tensor:
        """q_nope [1, B*T, H, nope], q_pe [1, B*T, H, rope], latent [1, B*T, W] -> [1, B*T, H, v]: each row attends
        within itself under the block-diagonal causal mask."""
        B, T = self.rows, self.seq_len
        o = mla.attend_expanded(q_nope.view(B, T, *q_nope.shape[2:]), q_pe.view(B, T, *q_pe.shape[2:]),
                                latent.view(B, T, -1), self.mask)
        return o.reshape(1, B * T, *o.shape[2:])

    def kda_state(self, layer: int):
        return None, None  # every document starts from zero state and an empty conv window

    def set_kda_state(self, layer: int, conv, state) -> None:
        pass  # final states of training documents are not kept

    def advance(self, num_tokens: int) -> None:
        pass


def packed_forward(model, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """input_ids [B, T] -> logits [B, T, vocab], documents isolated as described above (doc_ids None: each row is
    one document)."""
    B, T = input_ids.shape
    if doc_ids is None:
        return model(input_ids, positions=torch.arange(T, device=input_ids.device)[None])
    if doc_ids.shape != input_ids.shape:
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
    docs = Documents(doc_ids)
    if docs.trivial:
        return model(input_ids, positions=torch.arange(T, device=input_ids.device)[None])
    return model(input_ids.reshape(1, B * T), positions=docs.positions, cache=docs).view(B, T, -1)
