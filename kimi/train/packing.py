"""Packed training rows: several documents share one [T] row, and no token sees or inherits state from another.

The loader (train/data.py) cuts the token stream into rows of T tokens and gives each token a document index
`doc_ids [B, T]` (non-decreasing along a row; a row may start inside a document). `packed_forward` runs the model
so that every document behaves as if it were run on its own:
  The batch is flattened to one [1, B*T] row with `cu_seqlens` at every document start and every row start.
  MLA: causal attention within each of those pieces (MLA.attend_packed), so the layer's QK-Clip statistic never
       counts a logit across documents either.
  KDA: the short conv and the recurrent state start from zero for each piece (ops/kda.py's packed path).
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
        self.bounds = self.cu_seqlens.tolist()

    def mla_attention(self, mla, q_nope, q_pe, latent) -> torch.Tensor:
        """q_nope [1, B*T, H, nope], q_pe [1, B*T, H, rope], latent [1, B*T, W] -> [1, B*T, H, v]: every document
        piece attends causally within itself."""
        return mla.attend_packed(q_nope, q_pe, latent, self.bounds)

    def kda_state(self, layer: int):
        return None, None  # every document starts from zero state and an empty conv window

    def set_kda_state(self, layer: int, conv, state) -> None:
        pass  # final states of training documents are not kept

    def advance(self, num_tokens: int) -> None:
        pass


def packed_forward(model, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                   logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """input_ids [B, T] -> logits [B, T, vocab], documents isolated as described above (doc_ids None: each row is
    one document). logits_at: indices into the flattened B*T tokens; then only those rows get logits,
    [len(logits_at), vocab] (the loss needs them at target tokens only)."""
    B, T = input_ids.shape
    plain = doc_ids is None
    if not plain:
        if doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        docs = Documents(doc_ids)
        plain = docs.trivial
    if plain:
        logits = model(input_ids, positions=torch.arange(T, device=input_ids.device)[None], logits_at=logits_at)
    else:
        logits = model(input_ids.reshape(1, B * T), positions=docs.positions, cache=docs, logits_at=logits_at)
    return logits if logits_at is not None else logits.view(B, T, -1)
