"""KDA ops: chunked = recurrent = the float64 naive twin (Eq. 1), forward and backward; packing; dispatch.

Tolerances are RMS-relative errors, rms(got - ref) / rms(ref), like fla's assert_close: fp32 paths land near
1e-7..1e-6 against the float64 oracle, so 1e-5 (2e-5 with strong decay, whose in-chunk cumulative gate reaches
hundreds of nats and so carries fp32 rounding of ~1e-5 relative in exp(G_i - G_j)); gradients 1e-4.
"""

import logging

import pytest
import torch

import kimi.ops.kda as kda_ops
from kimi.ops.kda import backend, chunk_kda, kda, recurrent_kda, uses_fla
from kimi.ops.kda_naive import naive_kda


def rms_ratio(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, ratio: float):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rms_ratio(got, ref)
    assert err <= ratio, f"{name}: rms-relative error {err:.2e} > {ratio:.0e}"


def make_inputs(B, T, H, K, V, lo=-1.0, n_states=None, dtype=torch.float32):
    """Random q, k, v, log-decay g in [lo, 0], beta in (0, 1) and an initial state per sequence."""
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    g = torch.rand(B, T, H, K) * lo
    beta = torch.rand(B, T, H)
    h0 = torch.randn(n_states or B, H, K, V)
    return [x.to(dtype) for x in (q, k, v, g, beta)] + [h0.to(torch.float64 if dtype == torch.float64 else torch.float32)]


OPS = {"chunk": chunk_kda, "recurrent": recurrent_kda, "kda": kda}


@pytest.mark.parametrize("T", [1, 63, 65, 1000])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_naive(T, with_state):
    B, H, K, V = (1, 2, 16, 8) if T == 1000 else (2, 3, 33, 17)          # odd head dims
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V)
    h0 = h0 if with_state else None
    ref, ref_S = naive_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                           use_qk_l2norm_in_kernel=True)
    for name, op in OPS.items():
        if name == "recurrent" and T == 1000:
            continue                                                      # covered at T <= 65, and slow
        o, S = op(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert o.dtype == q.dtype and S.dtype == torch.float32
        assert_close(f"{name} o", o, ref, 1e-5)
        assert_close(f"{name} state", S, ref_S, 1e-5)


def test_float64_chunked_is_exact_algebra():
    """In float64 the chunked rewrite must agree with Eq. 1 to rounding, mild and strong gates alike."""
    for lo in (-0.5, -20.0):
        q, k, v, g, beta, h0 = make_inputs(1, 150, 2, 16, 8, lo=lo, dtype=torch.float64)
        ref, ref_S = naive_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True)
        o, S = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert o.dtype == torch.float64 and S.dtype == torch.float64
        assert_close("o", o, ref, 1e-11)
        assert_close("state", S, ref_S, 1e-11)


def test_strong_decay_where_exp_of_minus_G_overflows():
    """g in [-20, 0] on one head and mild on another: the in-chunk cumulative gate reaches far below -88, where
    exp(-G) overflows fp32; both the one-matmul (tame) and the split paths run in the same call."""
    q, k, v, g, beta, h0 = make_inputs(2, 200, 2, 16, 8, lo=-20.0)
    g[:, :, 1] *= 0.01
    G = g[:, :64].cumsum(1)
    assert (-G).max() > 88 and torch.isinf(torch.exp(-G)).any()
    ref, ref_S = naive_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    for name, op in OPS.items():
        o, S = op(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert_close(f"{name} o", o, ref, 2e-5)
        assert_close(f"{name} state", S, ref_S, 2e-5)


@pytest.mark.parametrize("case", ["T65", "T130-strong", "packed"])
def test_backward_matches_naive(case):
    cu = torch.tensor([0, 30, 30, 31, 100]) if case == "packed" else None
    T = {"T65": 65, "T130-strong": 130, "packed": 100}[case]
    B, n = (1, 4) if cu is not None else (2, 2)
    xs = make_inputs(B, T, 2, 16, 8, lo=-20.0 if "strong" in case else -1.0, n_states=n)
    do, dS = torch.randn(B, T, 2, 8), torch.randn(n, 2, 16, 8)
    grads = {}
    for name, op in [("naive", naive_kda), ("chunk", chunk_kda), ("recurrent", recurrent_kda)]:
        leaves = [x.clone().requires_grad_() for x in xs]
        o, S = op(*leaves[:5], initial_state=leaves[5], output_final_state=True, use_qk_l2norm_in_kernel=True,
                  cu_seqlens=cu)
        ((o * do).sum() + (S * dS).sum()).backward()
        grads[name] = [x.grad for x in leaves]
    for name in ("chunk", "recurrent"):
        for arg, got, ref in zip("q k v g beta h0".split(), grads[name], grads["naive"]):
            assert_close(f"{name} d{arg}", got, ref, 1e-4)


@pytest.mark.parametrize("op", [chunk_kda, recurrent_kda])
def test_packed_sequences_equal_separate_runs(op):
    bounds = [0, 5, 5, 70, 71, 200, 264]                                  # empty, 1 token, chunk-crossing
    cu = torch.tensor(bounds)
    n = len(bounds) - 1
    q, k, v, g, beta, h0 = make_inputs(1, bounds[-1], 2, 16, 8, n_states=n)
    o, S = op(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
              cu_seqlens=cu)
    for i in range(n):
        s, e = bounds[i], bounds[i + 1]
        if e == s:
            assert torch.equal(S[i], h0[i]), "an empty sequence must return its initial state"
            continue
        oi, Si = op(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], initial_state=h0[i:i + 1],
                    output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert_close(f"seq {i} o", o[:, s:e], oi, 1e-6)
        assert_close(f"seq {i} state", S[i:i + 1], Si, 1e-6)


def test_prefill_then_decode_equals_full_prefill():
    q, k, v, g, beta, h0 = make_inputs(2, 100, 2, 16, 8)
    full, full_S = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, S = kda(q[:, :90], k[:, :90], v[:, :90], g[:, :90], beta[:, :90], initial_state=h0,
               output_final_state=True, use_qk_l2norm_in_kernel=True)
    outs = [o]
    for t in range(90, 100):
        o, S = kda(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1], initial_state=S,
                   output_final_state=True, use_qk_l2norm_in_kernel=True)
        outs.append(o)
    assert_close("o", torch.cat(outs, 1), full, 1e-5)
    assert_close("state", S, full_S, 1e-5)


def test_chunk_sizes_and_scale_agree():
    q, k, v, g, beta, h0 = make_inputs(1, 100, 2, 16, 8)
    ref, _ = naive_kda(q, k, v, g, beta, scale=0.3, initial_state=h0, use_qk_l2norm_in_kernel=True)
    for C in (16, 24, 32, 64, 128):
        o, _ = chunk_kda(q, k, v, g, beta, scale=0.3, initial_state=h0, use_qk_l2norm_in_kernel=True, chunk_size=C)
        assert_close(f"chunk_size={C}", o, ref, 1e-5)


def test_unnormalised_inputs_match_naive():
    """Without the in-kernel L2 norm (the caller normalised already), small keys keep the recurrence stable."""
    q, k, v, g, beta, h0 = make_inputs(1, 80, 2, 16, 8)
    k = k / k.norm(dim=-1, keepdim=True)
    ref, _ = naive_kda(q, k, v, g, beta, initial_state=h0)
    for name, op in OPS.items():
        o, _ = op(q, k, v, g, beta, initial_state=h0)
        assert_close(name, o, ref, 1e-5)


def test_bf16_inputs_keep_fp32_state():
    q, k, v, g, beta, h0 = make_inputs(1, 100, 2, 16, 8)
    ref, ref_S = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    lo = [x.bfloat16() for x in (q, k, v)]
    for name, op in OPS.items():
        o, S = op(*lo, g, beta.bfloat16(), initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
        assert_close(f"{name} o", o, ref, 2e-2)
        assert_close(f"{name} state", S, ref_S, 2e-2)


def test_matches_transformers_reference():
    hf = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    q, k, v, g, beta, h0 = make_inputs(1, 70, 2, 16, 8)
    for name, ref_fn, op in [("chunk", hf.chunk_kimi_delta_attention, chunk_kda),
                             ("recurrent", hf.recurrent_kimi_delta_attention, recurrent_kda)]:
        ref, ref_S = ref_fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        o, S = op(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert_close(f"{name} o", o, ref, 1e-5)
        assert_close(f"{name} state", S, ref_S, 1e-5)


def test_bad_input_is_rejected():
    q, k, v, g, beta, h0 = make_inputs(2, 10, 2, 8, 4)
    with pytest.raises(ValueError, match="k must have shape"):
        chunk_kda(q, k[..., :4], v, g, beta)
    with pytest.raises(ValueError, match="beta must have shape"):
        chunk_kda(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="v must be"):
        recurrent_kda(q, k, v[:, :3], g, beta)
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_kda(q, k, v, g, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_kda(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        chunk_kda(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_kda(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match="floating-point"):
        kda(q.long(), k, v, g, beta)


def test_dispatch_picks_recurrent_for_decode_and_logs_backend(monkeypatch, caplog):
    calls = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(kda_ops, "chunk_kda", spy(chunk_kda))
    monkeypatch.setattr(kda_ops, "recurrent_kda", spy(recurrent_kda))
    monkeypatch.setenv("KIMI_KDA_BACKEND", "torch")
    backend.cache_clear()
    q, k, v, g, beta, h0 = make_inputs(3, 5, 2, 8, 4)
    with caplog.at_level(logging.INFO, logger="kimi"):
        kda(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1])           # decode: one token per sequence
        kda(q, k, v, g, beta)                                             # prefill
        packed = [x.reshape(1, 15, *x.shape[2:]) for x in (q, k, v, g, beta)]
        kda(*packed[:3], packed[3], packed[4], cu_seqlens=torch.tensor([0, 5, 10, 15]))
        kda(*(x[:1, :3] for x in (q, k, v, g, beta)), cu_seqlens=torch.tensor([0, 1, 2, 3]))
    assert calls == ["recurrent_kda", "chunk_kda", "chunk_kda", "recurrent_kda"]
    assert backend() == "torch"
    assert [r.getMessage() for r in caplog.records].count("KDA backend: torch (KIMI_KDA_BACKEND=torch)") == 1
    backend.cache_clear()


def test_backend_override_is_validated(monkeypatch):
    try:
        monkeypatch.setenv("KIMI_KDA_BACKEND", "triton")
        backend.cache_clear()
        with pytest.raises(ValueError, match="KIMI_KDA_BACKEND must be"):
            backend()
        if not torch.cuda.is_available():
            monkeypatch.setenv("KIMI_KDA_BACKEND", "fla")
            backend.cache_clear()
            with pytest.raises(ValueError, match="needs a CUDA device"):
                backend()
    finally:
        backend.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 65, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_matches_torch_on_cuda(T, dtype, monkeypatch):
    pytest.importorskip("fla.ops.kda")
    q, k, v, g, beta, h0 = (x.cuda() for x in make_inputs(2, T, 4, 64, 64))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    args = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref, ref_S = (chunk_kda if T > 1 else recurrent_kda)(q, k, v, g, beta.to(dtype), **args)
    monkeypatch.setenv("KIMI_KDA_BACKEND", "fla")
    backend.cache_clear()
    try:
        o, S = kda(q, k, v, g, beta.to(dtype), **args)
    finally:
        backend.cache_clear()
    tol = 3e-3 if dtype == torch.float32 else 2e-2  # fla runs fp32 through TF32 products: ~1e-3 (kda.backend)
    assert_close("o", o.float(), ref.float(), tol)
    assert_close("state", S, ref_S, tol)


@pytest.mark.gpu
def test_automatic_backend_keeps_fp32_exact(monkeypatch):
    pytest.importorskip("fla.ops.kda")
    monkeypatch.delenv("KIMI_KDA_BACKEND", raising=False)
    backend.cache_clear()
    try:
        assert backend() == "fla-half"
        x = torch.zeros(1, 2, 1, 4, device="cuda")
        assert not uses_fla(x) and uses_fla(x.bfloat16()) and not uses_fla(x.cpu().bfloat16())
    finally:
        backend.cache_clear()
