"""kimi's C kernels for CPU decode (kimi/ops/cpu_kernels.py) against their plain twins: gemv against an fp32 product,
mla_decode against ops/attention.py's torch path, moe_combine bit for bit against Experts._combine's torch
expression, moe_experts against Experts, and a packed model's single-row decode steps against the plain model. Skipped where the kernels cannot
run (no AVX-512 or no C compiler)."""

import pytest
import torch
import torch.nn.functional as F

from kimi.model.cache import DenseCache
from kimi.model.mla import causal_mask
from kimi.model.model import build_model
from kimi.ops import attention, cpu_kernels
from kimi.ops.packed_linear import pack_for_cpu
from tests.test_model import k2_tiny, kl_tiny
from tests.threads import torch_threads

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="kimi's C kernels need AVX-512 and a C compiler")


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 5), (64, 16), (300, 100), (1001, 37), (257, 768)])
def test_gemv_matches_an_fp32_product(rows, n, k):
    g = torch.Generator().manual_seed(n * k + rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    y = cpu_kernels.gemv(x, w)
    ref = x.float() @ w.float().T
    # one bf16 rounding of the result, plus fp32 summation-order error on the scale of sum |x| |w|
    bound = ref.abs() * 2 ** -8 + 1e-5 * (x.float().abs() @ w.float().abs().T)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    assert ((y.float() - ref).abs() <= bound).all()


def test_gemv_is_the_same_on_any_number_of_threads_and_layouts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 768, generator=g).bfloat16()
    w = torch.randn(1024, 768, generator=g).bfloat16()
    one = cpu_kernels.gemv(x, w)
    with torch_threads(2):
        two = cpu_kernels.gemv(x, w)
    assert one.shape == (2, 3, 1024) and torch.equal(one, two)
    strided = torch.randn(768, 2, generator=g).bfloat16()[:, 0]  # a non-contiguous row
    assert torch.equal(cpu_kernels.gemv(strided, w), cpu_kernels.gemv(strided.contiguous(), w))


def test_gemv_rejects_what_it_cannot_compute():
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernels.gemv(torch.randn(1, 16), w)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernels.gemv(torch.randn(1, 8).bfloat16(), w.T)
    with pytest.raises(ValueError, match=r"\[\.\.\., K\]"):
        cpu_kernels.gemv(torch.randn(1, 15).bfloat16(), w)


def _torch_path(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "available", lambda: False)
        return fn()


@pytest.mark.parametrize("lengths,layout", [([1], "rows"), ([40], "rows"), ([300], "rows"), ([7, 1, 130], "rows"),
                                            ([1], "slice"), ([300], "slice"),  # a slice: one sequence's rows
                                            ([2049], "rows"), ([3000, 5, 2100], "rows"), ([5000], "slice")])  # split
@pytest.mark.parametrize("heads,rank", [(4, 32), (12, 80)])  # the kernel blocks 8 heads x 32 columns; and the rest
@pytest.mark.parametrize("pairs", [True, False])  # AVX512-BF16 pair dot products, or the fp32 form
def test_mla_decode_equals_the_torch_path(lengths, layout, heads, rank, pairs, monkeypatch):
    if pairs and not cpu_kernels.bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    monkeypatch.setattr(cpu_kernels, "bf16_dot", cpu_kernels.bf16_dot if pairs else (lambda: False))
    model = build_model(k2_tiny(num_attention_heads=heads, kv_lora_rank=rank), dtype=torch.bfloat16, seed=1).eval()
    mla = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(sum(lengths))
    W = mla.kv_lora_rank + mla.qk_rope_head_dim
    B, S = len(lengths), max(lengths)
    R = max(512, B * S + 100)  # cache rows
    cache = torch.randn(R, W, generator=g).bfloat16()
    q_nope = torch.randn(B, 1, mla.num_heads, mla.qk_nope_head_dim, generator=g).bfloat16()
    q_pe = torch.randn(B, 1, mla.num_heads, mla.qk_rope_head_dim, generator=g).bfloat16()
    mask = torch.arange(S)[None] < torch.tensor(lengths)[:, None]
    rows = slice(100, 100 + S) if layout == "slice" else torch.randperm(R, generator=g)[:B * S].view(B, S)
    with torch.inference_mode():
        got = attention.paged_decode(mla, q_nope, q_pe, cache, rows, mask)
        want = _torch_path(monkeypatch, lambda: attention.paged_decode(mla, q_nope, q_pe, cache, rows, mask))
    # both round q_lat, the scores, p and o_lat to bf16 at the same points; only fp32 summation orders differ
    assert got.shape == want.shape == (B, 1, mla.num_heads, mla.v_head_dim)
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    assert (got == want).float().mean() > 0.9


def test_mla_decode_splits_long_contexts_the_same_way_whatever_the_batch_and_threads():
    """Contexts over 2,048 tokens are attended in chunks in parallel; the split depends on the length alone, so each
    sequence's result is the same bit for bit alone or in a batch, on one thread or two."""
    if not cpu_kernels.bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    model = build_model(k2_tiny(num_attention_heads=8, kv_lora_rank=64), dtype=torch.bfloat16, seed=3).eval()
    mla = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([4500, 30, 2049, 2048])
    B, S = len(lengths), int(lengths.max())
    cache = torch.randn(B * S, mla.kv_lora_rank + mla.qk_rope_head_dim, generator=g).bfloat16()
    rows = torch.randperm(B * S, generator=g).view(B, S)
    q_nope = torch.randn(B, 1, 8, mla.qk_nope_head_dim, generator=g).bfloat16()
    q_pe = torch.randn(B, 1, 8, mla.qk_rope_head_dim, generator=g).bfloat16()
    with torch.inference_mode(), torch_threads(2):
        batch = cpu_kernels.mla_decode(mla, q_nope, q_pe, cache, rows, lengths)
    for b in range(B):
        for threads in (1, 2):
            with torch.inference_mode(), torch_threads(threads):
                alone = cpu_kernels.mla_decode(mla, q_nope[b:b + 1], q_pe[b:b + 1], cache, rows[b:b + 1],
                                               lengths[b:b + 1])
            assert torch.equal(alone, batch[b:b + 1])


@pytest.mark.parametrize("T,start", [(1, 0), (7, 0), (40, 0), (33, 64), (300, 0), (100, 157)])
@pytest.mark.parametrize("heads,v", [(4, 16), (12, 96)])  # v 96: a 64-column block and a 32-column one
def test_mla_prefill_equals_the_torch_path(T, start, heads, v):
    if not cpu_kernels.bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    model = build_model(k2_tiny(num_attention_heads=heads, v_head_dim=v), dtype=torch.bfloat16, seed=2).eval()
    mla = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(T + start)
    S, W = start + T, mla.kv_lora_rank + mla.qk_rope_head_dim
    q_nope = torch.randn(1, T, heads, mla.qk_nope_head_dim, generator=g).bfloat16()
    q_pe = torch.randn(1, T, heads, mla.qk_rope_head_dim, generator=g).bfloat16()
    latent = torch.randn(1, S + 5, W, generator=g).bfloat16()[:, :S]  # a view of a longer buffer, as DenseCache's
    with torch.inference_mode():
        want = mla.attend_expanded(q_nope, q_pe, latent, causal_mask(T, S, start, "cpu")).float()
        got = cpu_kernels.mla_prefill(mla, q_nope, q_pe, latent, start).float()
    # torch's CPU flash attention and the kernel round at the same points (p to bf16 before v, the output once)
    assert got.shape == want.shape == (1, T, heads, v)
    assert (got - want).abs().max() <= 2 ** -7 * want.abs().max()
    assert (got == want).float().mean() > 0.5


def _plain_packed_fp32(family, seed: int):
    """The same bf16 weights three ways: a plain model, a packed one (pack_for_cpu), and an fp32 copy to measure both
    against."""
    plain = build_model(family(), dtype=torch.bfloat16, seed=seed).eval()
    packed = build_model(family(), dtype=torch.bfloat16, seed=seed).eval()
    pack_for_cpu(packed)
    return plain, packed, build_model(family(), dtype=torch.bfloat16, seed=seed).float().eval()


@pytest.mark.parametrize("family", [k2_tiny, kl_tiny])
def test_packed_prefill_is_close_to_the_plain_model(family):
    """A prompt in one forward (the packed model's MLA layers attend through mla_prefill), and again in two chunks
    (the second over a cached prefix): the packed model's logits stay within bf16 noise of the plain model's,
    measured against an fp32 copy of the same weights."""
    plain, packed, exact = _plain_packed_fp32(family, seed=4)
    tokens = torch.randint(0, plain.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(1))
    logits = {}
    with torch.inference_mode():
        for name, m in {"plain": plain, "packed": packed, "fp32": exact}.items():
            for split in (70, 45):
                cache = DenseCache(m.config, 1, 70, m.dtype)
                first = m(tokens[:, :split], cache=cache).float()
                rest = [m(tokens[:, split:], cache=cache).float()] if split < 70 else []
                logits[name, split] = torch.cat([first, *rest], 1)
    for split in (70, 45):
        err_plain = (logits["plain", split] - logits["fp32", split]).abs().max()
        err_packed = (logits["packed", split] - logits["fp32", split]).abs().max()
        assert err_packed <= 2 * err_plain + 1e-3


@pytest.mark.parametrize("family", [k2_tiny, kl_tiny])
def test_packed_single_row_decode_steps_are_close_to_the_plain_model(family):
    """Teacher-forced decode, one token at a time (every projection a single row, so gemv runs): a packed model's
    logits stay within bf16 noise of the plain model's, measured against an fp32 copy of the same weights."""
    plain, packed, exact = _plain_packed_fp32(family, seed=3)
    tokens = torch.randint(0, plain.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.inference_mode():
        for name, m in {"plain": plain, "packed": packed, "fp32": exact}.items():
            cache, out = DenseCache(m.config, 1, 24, m.dtype), []
            for t in range(24):
                out.append(m(tokens[:, t:t + 1], cache=cache).float())
            logits[name] = torch.cat(out, 1)
    err_plain = (logits["plain"] - logits["fp32"]).abs().max()
    err_packed = (logits["packed"] - logits["fp32"]).abs().max()
    assert err_packed <= 2 * err_plain + 1e-3
    assert (logits["packed"] - logits["plain"]).abs().max() <= 4 * err_plain + 1e-3


def test_rms_norm_matches_the_model_norm():
    from kimi.model.layers import RMSNorm

    g = torch.Generator().manual_seed(0)
    for d in (5, 64, 768):
        norm = RMSNorm(d, 1e-6).bfloat16()
        with torch.no_grad():
            norm.weight.copy_(torch.randn(d, generator=g))
        for rows in (1, 3, 100):  # from 16 rows on, split between threads: each row the same on 1 or 2
            x = (torch.randn(rows, d, generator=g) * 7).bfloat16()
            with torch.inference_mode():
                got, want = cpu_kernels.rms_norm(x, norm.weight, 1e-6), norm(x)
                with torch_threads(1):
                    assert torch.equal(cpu_kernels.rms_norm(x, norm.weight, 1e-6), got)
                assert torch.equal(cpu_kernels.rms_norm(x[-1:], norm.weight, 1e-6), got[-1:])
            assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
            assert (got == want).float().mean() > 0.95


def test_swiglu_matches_the_torch_single_row_path():
    g = torch.Generator().manual_seed(0)
    D, I = 96, 40
    x = torch.randn(1, D, generator=g).bfloat16()
    gate_up = (torch.randn(2 * I, D, generator=g) * 0.2).bfloat16()
    down = (torch.randn(D, I, generator=g) * 0.2).bfloat16()
    gu = cpu_kernels.gemv(x, gate_up)
    want = cpu_kernels.gemv(F.silu(gu[:, :I]) * gu[:, I:], down)  # what PackedExperts.expert does for one row
    got = cpu_kernels.swiglu(x, gate_up, down)
    assert got.shape == (1, D) and (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    total = torch.ones(1, D)
    assert cpu_kernels.swiglu(x, gate_up, down, 0.37, total) is None
    assert torch.allclose(total, 1 + (got * torch.tensor([[0.37]])).bfloat16().float(), atol=1e-2)


@pytest.mark.parametrize("tokens,k,dim", [(1, 1, 16), (300, 2, 100), (2048, 8, 768)])
def test_moe_combine_is_bitwise_the_torch_expression(tokens, k, dim):
    """Experts._combine's torch expression (fp32 products rounded to bf16, index_add_ summing in fp32 and rounding
    once) and the C kernel agree bit for bit, on any number of threads, with the rows grouped by expert as _grouped
    groups them; and a token no row names comes out zero."""
    from kimi.model.moe import Experts
    g = torch.Generator().manual_seed(tokens)
    idx = torch.stack([torch.randperm(16, generator=g)[:k] for _ in range(tokens)])
    token = idx.flatten().argsort(stable=True) // k
    y = torch.randn(tokens * k, dim, generator=g).bfloat16()
    w = torch.rand(tokens * k, generator=g) * 2.5
    x = torch.empty(tokens + 1, dim, dtype=torch.bfloat16)  # one more token than the rows name
    want = Experts._combine(None, y, w, token, x)
    for threads in (1, 2):
        with torch_threads(threads):
            got = cpu_kernels.moe_combine(y, w, token, tokens + 1)
        assert torch.equal(got, want) and not got[-1].any()
    with pytest.raises(ValueError, match="token"):
        cpu_kernels.moe_combine(y, w, token, tokens - 1 if tokens > 1 else 0)


@pytest.mark.skipif(not cpu_kernels.bf16_dot(), reason="moe_experts needs AVX512-BF16")
@pytest.mark.parametrize("tokens,k,E,D,I", [(1, 2, 16, 64, 32), (3, 8, 16, 128, 96), (70, 2, 8, 192, 64),
                                            (257, 1, 4, 64, 160)])
def test_moe_experts_match_the_torch_experts(tokens, k, E, D, I):
    """The whole routed-experts block in one C call against Experts.forward in bf16 (the same roundings; only the
    products' fp32 summation order differs), on 1 and 2 threads bit for bit alike; and a token's output does not
    depend on which other tokens share the call (each row's sums run in one fixed order)."""
    from kimi.model.moe import Experts
    g = torch.Generator().manual_seed(tokens)
    experts = Experts(E, D, I)
    for w in experts.parameters():
        w.data = (torch.randn(w.shape, generator=g) * 0.1).bfloat16()
    x = torch.randn(tokens, D, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g) * 2.5
    gate_up, down = cpu_kernels.expert_tiles(experts.gate_proj.data, experts.up_proj.data, experts.down_proj.data)
    with torch.inference_mode():
        want = experts(x, idx, w).float()
    outs = []
    for threads in (1, 2):
        with torch_threads(threads):
            outs.append(cpu_kernels.moe_experts(x, idx, w, gate_up, down))
    got = outs[0]
    assert torch.equal(outs[0], outs[1])
    assert (got.float() - want).abs().max() <= 2 ** -6 * want.abs().max()
    assert (got.float() == want).float().mean() > 0.8
    last = cpu_kernels.moe_experts(x[-1:], idx[-1:], w[-1:], gate_up, down)
    assert torch.equal(last, got[-1:])
    with pytest.raises(ValueError, match="expert ids"):
        cpu_kernels.moe_experts(x, idx + E, w, gate_up, down)
    with pytest.raises(ValueError, match="multiple of 64"):
        cpu_kernels.expert_tiles(experts.gate_proj.data[:, :, :48], experts.up_proj.data[:, :, :48],
                                 experts.down_proj.data[:, :48])


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_route_one_picks_the_routers_experts(groups):
    from kimi.model.moe import Router

    n_group, topk_group = groups
    cfg = k2_tiny(n_routed_experts=16, num_experts_per_tok=4, n_group=n_group, topk_group=topk_group)
    router = Router(cfg).bfloat16()
    g = torch.Generator().manual_seed(n_group)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.1)
    for _ in range(20):
        x = torch.randn(1, cfg.hidden_size, generator=g).bfloat16()
        want_idx, want_w = router(x)
        got_idx, got_w = cpu_kernels.route_one(router, x)
        assert torch.equal(got_idx, want_idx)  # best first, as topk orders them
        assert torch.allclose(got_w, want_w, rtol=1e-5)


class PoolCache:
    """The engine's KDA cache protocol over pools of `slots` rows, B sequences living at rows `rows`."""

    cu_seqlens = None

    def __init__(self, windows, states, rows):
        self.windows, self.states, self.rows = windows, states, rows

    def kda_state(self, layer):
        return self.windows[self.rows], self.states[self.rows]

    def set_kda_state(self, layer, conv, state):
        self.windows[self.rows], self.states[self.rows] = conv, state

    def kda_slots(self, layer):
        return self.windows, self.states, self.rows


@pytest.mark.parametrize("head_dim,B", [(16, 1), (16, 3), (24, 3)])  # 24: the kernel's 16-lane tail
def test_kda_decode_equals_the_torch_layer(head_dim, B):
    from kimi.ops.packed_linear import OneRowKDA

    lac = {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": head_dim, "num_heads": 4,
           "short_conv_kernel_size": 4}
    layer = build_model(kl_tiny(linear_attn_config=lac), dtype=torch.bfloat16, seed=5).model.layers[0].self_attn
    fast = OneRowKDA(layer)
    g = torch.Generator().manual_seed(head_dim + B)
    P = 4 * head_dim
    windows = torch.randn(6, 3 * P, 3, generator=g).bfloat16()
    states = torch.randn(6, 4, head_dim, head_dim, generator=g) * 0.3
    rows = torch.tensor([4, 0, 2][:B])
    x = torch.randn(B, 1, layer.q_proj.in_features, generator=g).bfloat16()
    caches = [PoolCache(windows.clone(), states.clone(), rows) for _ in range(2)]
    with torch.inference_mode():
        for _ in range(3):  # three steps: the windows slide, the states carry
            want = layer(x, cache=caches[0])
            got = fast(x, cache=caches[1])
            assert got.shape == want.shape == (B, 1, layer.q_proj.in_features)
            # the same roundings, fp32 summation order aside (bit-equal on these shapes when written)
            assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
            assert (got == want).float().mean() > 0.95
            x = want
    assert torch.equal(caches[1].windows, caches[0].windows)  # slid in place, other rows untouched
    assert (caches[1].states - caches[0].states).abs().max() <= 1e-4 * caches[0].states.abs().max()
    untouched = [r for r in range(6) if r not in rows.tolist()]
    assert torch.equal(caches[1].states[untouched], states[untouched])
    with torch.inference_mode(), pytest.raises(ValueError, match="outside"):
        fast(x, cache=PoolCache(windows.clone(), states.clone(), torch.tensor([6, 0, 1][:B])))


def test_without_a_compiler_or_when_turned_off_the_torch_paths_run(tmp_path):
    import os
    import subprocess
    import sys

    probe = "from kimi.ops import cpu_kernels; print(cpu_kernels.available())"
    for env in ({"KIMI_CPU_KERNELS": "0"}, {"CC": "false", "KIMI_CACHE_DIR": str(tmp_path)}):  # `false` fails the build
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == "False", (env, out.stderr)


@pytest.mark.parametrize("family", [k2_tiny, kl_tiny])  # YaRN RoPE and q_lora; NoPE and a plain q_proj
def test_one_row_mla_projections_equal_the_plain_layer(family):
    from kimi.ops.packed_linear import OneRowMLA

    plain = build_model(family(), dtype=torch.bfloat16, seed=6).eval()
    packed = build_model(family(), dtype=torch.bfloat16, seed=6).eval()
    pack_for_cpu(packed)
    layer = next(i for i, kind in enumerate(plain.config.layer_types) if kind == "mla")
    mla, fast = plain.model.layers[layer].self_attn, packed.model.layers[layer].self_attn
    assert isinstance(fast, OneRowMLA) and fast.in_plain is not None
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for pos in (0, 5, 300):
            x = torch.randn(1, 1, plain.config.hidden_size, generator=g).bfloat16()
            positions = torch.tensor([[pos]])
            for got, want in zip(fast.project(x, positions), mla.project(x, positions)):
                assert got.shape == want.shape
                assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
                assert (got == want).float().mean() > 0.95  # bit-equal on these shapes when written
