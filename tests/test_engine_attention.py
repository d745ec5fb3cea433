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
from tests.test_model import PackedStates, k2_tiny, kl_tiny

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
    # gathering into a reused scratch buffer (larger than needed, holding stale values) changes nothing
    buffer = torch.randn(rows.numel() + 7, cache.shape[1], dtype=cache.dtype)
    assert torch.equal(paged_decode(mla, q_nope, q_pe, cache, rows, mask, buffer), got)
    assert torch.equal(paged_decode(mla, q_nope, q_pe, cache, rows, mask, buffer), got)


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
                      torch.zeros(0, dtype=torch.long), [DecodeBatch(torch.tensor([7, 13]), rows, mask)], chunks)
    got = ctx.mla_attention(mla, q_nope, q_pe, latent)
    cache[torch.tensor(slots)] = latent[0]
    assert torch.equal(kv[0], cache)  # the step's latents landed in their slots
    want = paged_attention_reference(mla, q_nope, q_pe, cache, tables, starts, counts, BS)
    assert (got - want).abs().max() < 1e-6  # the absorbed form takes its softmax in fp32


def test_decode_groups_equal_one_batch():
    """The runner attends many decode queries in groups of similar context length; the split changes nothing."""
    lengths = [30, 2, 17, 9, 25]
    mla, tables, cache = setup(k2_tiny, lengths, seed=2)
    B, H = len(lengths), mla.num_heads
    q_nope = torch.randn(B, 1, H, mla.qk_nope_head_dim, dtype=torch.float64)
    q_pe = torch.randn(B, 1, H, mla.qk_rope_head_dim, dtype=torch.float64)
    latent = torch.randn(B, 1, cache.shape[1], dtype=torch.float64)
    slots = torch.tensor([t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, lengths)])

    def attend(groups):
        decode = [DecodeBatch(None if g is None else torch.tensor(g),
                              *context_rows([tables[i] for i in (g or range(B))],
                                            [lengths[i] for i in (g or range(B))], BS, "cpu")) for g in groups]
        buffer = torch.empty(B * max(lengths), cache.shape[1], dtype=torch.float64)
        ctx = StepContext(cache.clone()[None], {mla.layer_idx: 0}, StatePool(k2_tiny(), 1, 0, torch.float64), slots,
                          None, torch.zeros(0, dtype=torch.long), decode, [], buffer)
        return ctx.mla_attention(mla, q_nope, q_pe, latent)

    one = attend([None])  # (a group's padding length changes only the summation order)
    assert torch.allclose(attend([[1, 3], [2, 4, 0]]), one, rtol=0, atol=1e-12)
    assert torch.allclose(attend([[4], [0, 1, 2, 3]]), one, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lens", [[1, 7, 1, 1, 70, 1], [65, 1], [1, 1, 2, 1], [3, 64, 1, 0, 5]])
def test_kda_layer_in_a_packed_step_equals_each_sequence_alone(lens):
    """Decodes (one token each) packed among prefill chunks run apart inside the layer (recurrent form for the
    decodes, chunked for the rest) and its short conv runs once over the packed row: every sequence's output, conv
    window and state must equal running it alone from the same state."""
    from kimi.model.kda import KDA

    model = build_model(kl_tiny(), dtype=torch.float64, seed=2)
    kda = next(m for m in model.modules() if isinstance(m, KDA))
    D, N = model.config.hidden_size, len(lens)
    P, K = kda.num_heads * kda.head_dim, kda.head_dim
    g = torch.Generator().manual_seed(sum(lens))
    xs = [torch.randn(1, n, D, dtype=torch.float64, generator=g) for n in lens]
    conv0 = torch.randn(N, 3 * P, kda.conv_size - 1, dtype=torch.float64, generator=g)
    state0 = torch.randn(N, kda.num_heads, K, K, dtype=torch.float64, generator=g) * 0.1
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    packed = PackedStates(cu, conv0.clone(), state0.clone())
    out = kda(torch.cat(xs, 1), cache=packed)
    for i, x in enumerate(xs):
        if lens[i] == 0:
            assert torch.equal(packed.conv[i], conv0[i])  # an empty sequence keeps its window
            continue
        alone = PackedStates(None, conv0[i:i + 1].clone(), state0[i:i + 1].clone())
        want = kda(x, cache=alone)
        # fp64; the chunked op itself agrees packed vs alone to ~1e-7 on these random weights (its UT solve)
        assert (out[:, cu[i]:cu[i + 1]] - want).abs().max() < 1e-6
        assert (packed.conv[i] - alone.conv[0]).abs().max() < 1e-12  # projections of its last inputs
        assert (packed.state[i] - alone.state[0]).abs().max() < 1e-6
