"""Paged latent attention (kimi/ops/attention.py, engine/context.py) against its plain twin: per sequence, token by
token gather, dense expanded MLA. Non-contiguous block tables, odd lengths, decode rows and prefill chunks mixed."""

import random

import pytest
import torch

from kimi.engine.context import Chunk, DecodeBatch, StepContext
from kimi.engine.state_pool import StatePool
from kimi.model.mla import MLA
from kimi.model.model import build_model
from kimi.ops.attention import context_rows, contiguous, paged_attention_reference, paged_decode
from tests.test_model import k2_tiny, kl_tiny

BS = 4


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def setup(family, lengths, seed=0):
    cfg = family()
    mla = next(m for m in build_model(cfg, dtype=torch.float64).modules() if isinstance(m, MLA))
    rng = random.Random(seed)
    num_blocks = sum(-(-n // BS) for n in lengths) + 5
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lengths]
    cache = torch.randn(num_blocks * BS, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=torch.float64)
    return mla, tables, cache


@pytest.mark.parametrize("family", [k2_tiny, kl_tiny])
def test_batched_decode_equals_reference(family):
    lengths = [1, 5, 13, 4, 30]
    mla, tables, cache = setup(family, lengths)
    H = mla.num_heads
    q_nope = torch.randn(len(lengths), 1, H, mla.qk_nope_head_dim, dtype=torch.float64)
    q_pe = torch.randn(len(lengths), 1, H, mla.qk_rope_head_dim, dtype=torch.float64)
    rows, mask = context_rows(tables, lengths, BS, "cpu")
    got = paged_decode(mla, q_nope, q_pe, cache, rows, mask)  # [B, 1, H, v]
    want = paged_attention_reference(mla, q_nope.transpose(0, 1), q_pe.transpose(0, 1), cache, tables,
                                     [n - 1 for n in lengths], [1] * len(lengths), BS)
    assert (got.transpose(0, 1) - want).abs().max() < 1e-6  # the absorbed form takes its softmax in fp32


def test_contiguous_tables_read_in_place():
    assert contiguous([3, 4, 5], 10, BS) == slice(12, 22)
    assert contiguous([3, 5, 6], 10, BS) is None
    assert contiguous([7], 1, BS) == slice(28, 29)
    assert contiguous([3, 4, 9], 8, BS) == slice(12, 20)  # only the blocks holding the tokens matter
    mla, _, cache = setup(k2_tiny, [9])
    q_nope = torch.randn(1, 1, mla.num_heads, mla.qk_nope_head_dim, dtype=torch.float64)
    q_pe = torch.randn(1, 1, mla.num_heads, mla.qk_rope_head_dim, dtype=torch.float64)
    table = [2, 3, 4]
    via_slice = paged_decode(mla, q_nope, q_pe, cache, contiguous(table, 9, BS), torch.ones(1, 9, dtype=torch.bool))
    rows, mask = context_rows([table], [9], BS, "cpu")
    assert torch.equal(via_slice, paged_decode(mla, q_nope, q_pe, cache, rows, mask))


@pytest.mark.parametrize("family", [k2_tiny, kl_tiny])
def test_step_context_mixed_decode_and_chunks_equals_reference(family):
    """A packed step: a fresh 7-token prefill, a decode, a 5-token continuation of an 11-token prefix, a decode."""
    lengths = [7, 9, 16, 3]
    starts = [0, 8, 11, 2]
    counts = [7, 1, 5, 1]
    mla, tables, cache = setup(family, lengths, seed=1)
    N = sum(counts)
    H = mla.num_heads
    q_nope = torch.randn(1, N, H, mla.qk_nope_head_dim, dtype=torch.float64)
    q_pe = torch.randn(1, N, H, mla.qk_rope_head_dim, dtype=torch.float64)
    latent = torch.randn(1, N, cache.shape[1], dtype=torch.float64)
    slots, offs = [], [0]
    for t, s, n in zip(tables, starts, counts):
        slots += [t[p // BS] * BS + p % BS for p in range(s, s + n)]
        offs.append(offs[-1] + n)
    kv = cache.clone()[None]
    dec = [1, 3]
    rows, mask = context_rows([tables[i] for i in dec], [starts[i] + 1 for i in dec], BS, "cpu")
    chunks = [Chunk(0, 7, 0, None),
              Chunk(8, 13, 11, context_rows([tables[2]], [16], BS, "cpu")[0][0])]
    ctx = StepContext(kv, {mla.layer_idx: 0}, StatePool(k2_tiny(), 1, 0, torch.float64), torch.tensor(slots), None,
                      torch.zeros(0, dtype=torch.long), DecodeBatch(torch.tensor([7, 13]), rows, mask), chunks)
    got = ctx.mla_attention(mla, q_nope, q_pe, latent)
    cache[torch.tensor(slots)] = latent[0]
    assert torch.equal(kv[0], cache)  # the step's latents landed in their slots
    want = paged_attention_reference(mla, q_nope, q_pe, cache, tables, starts, counts, BS)
    assert (got - want).abs().max() < 1e-6  # the absorbed form takes its softmax in fp32
