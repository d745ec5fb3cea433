"""Block-FP8 and INT4 W4A16 numerics (kimi/ops/quant.py) against the format definitions in reference k2.md §5,
and the weight-only linears against their dequantise-then-F.linear twins."""

import math

import pytest
import torch
import torch.nn.functional as F

from kimi.ops.quant import (Fp8BlockLinear, Int4Linear, _cpu_kernel_block_n, dequantize_fp8_block, dequantize_int4,
                            fp8_block_linear, fp8_block_linear_reference, int4_cpu_kernel_applies, int4_linear,
                            int4_linear_reference, pack_int4, quantize_fp8_block, quantize_int4,
                            to_checkpoint_layout_, to_cpu_kernel_layout_, unpack_int4)

HAS_CPU_KERNEL = _cpu_kernel_block_n() is not None


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()])


def _close(y, ref, dtype):
    """Relative to the output's scale: fp32 paths agree to rounding, bf16 ones to a few bf16 ulps."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (y.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err <= tol, f"relative error {err:.3g} > {tol}"


# Block FP8

def _assert_fp8_within_half_a_step(w, q, s, block=128):
    se = s.repeat_interleave(block, -2)[..., :w.shape[-2], :].repeat_interleave(block, -1)[..., :w.shape[-1]]
    v = (w / se).abs()
    # e4m3: 3 mantissa bits, smallest normal exponent -6 (below it the step is fixed at 2**-9)
    step = torch.exp2(torch.floor(torch.log2(v.clamp_min(2.0**-6))) - 3)
    err = (dequantize_fp8_block(q, s, torch.float32, block) - w).abs()
    assert (err <= 0.5 * step * se * (1 + 1e-6) + 1e-30).all()

def test_fp8_decode_is_exact_for_every_finite_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(2, 128)
    got = dequantize_fp8_block(codes, torch.ones(1, 1), torch.float32)
    want = codes.to(torch.float32)
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite])


@pytest.mark.parametrize("shape", [(576, 300), (3, 130, 257)])
def test_fp8_roundtrip_within_half_a_step(shape):
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3
    q, s = quantize_fp8_block(w)
    assert q.shape == w.shape and q.dtype == torch.float8_e4m3fn
    assert s.shape == (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    _assert_fp8_within_half_a_step(w, q, s)


def test_fp8_scales_are_block_absmax_over_448_with_partial_edge_blocks():
    w = torch.randn(576, 320, dtype=torch.float64)  # 576 = 4.5 blocks of rows, 320 = 2.5 blocks of columns
    _, s = quantize_fp8_block(w)
    assert s.shape == (5, 3) and s.dtype == torch.float32
    for i in range(5):
        for j in range(3):
            amax = w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].abs().max()
            assert s[i, j].item() == torch.tensor(amax.item() / 448, dtype=torch.float32).item()


def test_fp8_small_blocks_and_stacked_experts_match_per_expert():
    w = torch.randn(4, 72, 40)
    q, s = quantize_fp8_block(w, block=32)
    assert s.shape == (4, 3, 2)
    for e in range(4):
        qe, se = quantize_fp8_block(w[e], block=32)
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)
        assert torch.equal(dequantize_fp8_block(q, s, torch.float32, 32)[e], dequantize_fp8_block(qe, se, torch.float32, 32))


def test_fp8_requantising_quantised_values_is_exact():
    q, s = quantize_fp8_block(torch.randn(300, 200))
    q2, s2 = quantize_fp8_block(dequantize_fp8_block(q, s, torch.float64))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    # From fp32 weights q*s is rounded once, so the bytes come back exactly and the scale to within an ulp.
    q3, s3 = quantize_fp8_block(dequantize_fp8_block(q, s, torch.float32))
    assert torch.equal(q3.view(torch.uint8), q.view(torch.uint8))
    torch.testing.assert_close(s3, s, rtol=2.0**-23, atol=0)


def test_fp8_zero_block_gets_a_safe_scale_and_large_scales_work():
    w = torch.randn(256, 256) * 1e5  # scales around 1e3: exercises the unfolded 2**120 path
    w[:128, 128:] = 0
    q, s = quantize_fp8_block(w)
    assert s[0, 1] == 1.0 and torch.isfinite(s).all()
    d = dequantize_fp8_block(q, s, torch.float32)
    assert (d[:128, 128:] == 0).all()
    _assert_fp8_within_half_a_step(w, q, s)
    x = torch.randn(3, 256)
    torch.testing.assert_close(fp8_block_linear(x, q, s), fp8_block_linear_reference(x, q, s), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("n_out,n_in", [(576, 300), (130, 129)])
def test_fp8_linear_matches_dequantise_then_linear(dtype, tokens, n_out, n_in):
    q, s = quantize_fp8_block(torch.randn(n_out, n_in) * 0.05)
    x = torch.randn(tokens, n_in, dtype=dtype)
    y = fp8_block_linear(x, q, s)
    assert y.dtype == dtype and y.shape == (tokens, n_out)
    _close(y, fp8_block_linear_reference(x, q, s), dtype)


def test_fp8_module_names_shapes_and_state_dict_round_trip():
    w = torch.randn(200, 136, dtype=torch.bfloat16)
    m = Fp8BlockLinear.from_float(w)
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scale_inv"}
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight"].shape == (200, 136)
    assert sd["weight_scale_inv"].dtype == torch.float32 and sd["weight_scale_inv"].shape == (2, 2)
    m2 = Fp8BlockLinear(136, 200)
    m2.load_state_dict(sd)
    x = torch.randn(2, 5, 136, dtype=torch.bfloat16)
    assert torch.equal(m2(x), m(x))
    _close(m(x), F.linear(x, m.dequantize(torch.bfloat16)), torch.bfloat16)
    assert _bytes(m) <= 0.51 * w.numel() * 2


# INT4 W4A16

def test_pack_int4_bit_order_against_hand_built_words():
    # Element k of 8 sits in bits 4k..4k+3 as q + 8, lowest bits first.
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1], [0, 1, 2, 3, 4, 5, 6, 7], [7, -8, 0, 0, 0, 0, 0, 0]])
    want = torch.tensor([[0x76543210], [0xFEDCBA98 - (1 << 32)], [0x8888880F]]).to(torch.int32)
    want[2] = 0x8888880F - (1 << 32)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and torch.equal(packed, want)
    assert torch.equal(unpack_int4(packed).long(), q)


def test_unpack_int4_matches_the_formats_shift_formula():
    packed = torch.randint(-(1 << 31), (1 << 31) - 1, (5, 7), dtype=torch.int64).to(torch.int32)
    p64 = packed.to(torch.int64) & 0xFFFFFFFF
    want = torch.stack([((p64 >> (4 * k)) & 0xF) - 8 for k in range(8)], -1).flatten(-2)  # q = ((P >> 4k) & 0xF) - 8
    assert torch.equal(unpack_int4(packed).long(), want)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)


def test_pack_int4_pads_with_zero_bits():
    q = torch.randint(-8, 8, (3, 13))
    packed = pack_int4(q)
    assert packed.shape == (3, 2)
    assert torch.equal(unpack_int4(packed, 13).long(), q)
    assert (unpack_int4(packed)[:, 13:] == -8).all()  # zero bits decode as -8 and are stripped by the shape


@pytest.mark.parametrize("shape", [(64, 256), (3, 40, 100)])
def test_int4_roundtrip_within_half_a_step(shape):
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,))
    packed, scale = quantize_int4(w)
    n_in = shape[-1]
    assert packed.shape == (*shape[:-1], math.ceil(n_in / 8)) and packed.dtype == torch.int32
    assert scale.shape == (*shape[:-1], math.ceil(n_in / 32)) and scale.dtype == torch.bfloat16
    groups = F.pad(w, (0, 32 * scale.shape[-1] - n_in)).unflatten(-1, (-1, 32))
    assert torch.equal(scale, (groups.abs().amax(-1) / 7).to(torch.bfloat16))
    se = scale.float().repeat_interleave(32, -1)[..., :n_in]
    err = (dequantize_int4(packed, scale, shape[-2:], torch.float32) - w).abs()
    assert (err <= 0.5 * se * (1 + 1e-6)).all()
    assert unpack_int4(packed, n_in).abs().max() <= 7


def test_int4_requantising_quantised_values_is_exact():
    packed, scale = quantize_int4(torch.randn(48, 200))
    p2, s2 = quantize_int4(dequantize_int4(packed, scale, (48, 200), torch.float32))
    assert torch.equal(p2, packed) and torch.equal(s2, scale)


def test_int4_zero_group_gets_a_safe_scale():
    w = torch.randn(8, 64)
    w[:, :32] = 0
    packed, scale = quantize_int4(w)
    assert (scale[:, 0] == 1).all() and torch.isfinite(scale).all()
    assert (dequantize_int4(packed, scale, (8, 64), torch.float32)[:, :32] == 0).all()


def test_cpu_kernel_layout_is_recognised_on_avx512():
    # The layout probe falls back to unpack-and-scale silently (with a log line). On the AVX512 machines this
    # was written on it must find the kernel, so that a torch change of layout shows up here.
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("layout verified on AVX512 only")
    assert _cpu_kernel_block_n() == 64


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="torch's CPU int4 kernel layout is unknown here")
@pytest.mark.parametrize("shape", [(128, 256), (192, 64), (3, 64, 96)])
def test_cpu_kernel_layout_matches_torch_converter_and_inverts(shape):
    packed, _ = quantize_int4(torch.randn(shape))
    flat = packed.reshape(-1, packed.shape[-1])
    nibbles = (unpack_int4(flat).to(torch.int32) + 8)
    want = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles[r:r + shape[-2]], 1).flatten()
                      for r in range(0, flat.shape[0], shape[-2])])
    kernel = to_cpu_kernel_layout_(packed.clone())
    assert torch.equal(kernel.view(torch.uint8).flatten(), want)
    assert torch.equal(to_checkpoint_layout_(kernel), packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("n_out,n_in", [(128, 256), (192, 96)])
def test_int4_module_matches_dequantise_then_linear(dtype, tokens, n_out, n_in):
    m = Int4Linear.from_float(torch.randn(n_out, n_in) * 0.05)
    twin = int4_linear_reference
    x = torch.randn(2, tokens, n_in, dtype=dtype)
    ref = twin(x, m.weight_packed, m.weight_scale, m.weight_shape)
    y = m(x)
    assert y.dtype == dtype and y.shape == (2, tokens, n_out)
    assert m.kernel_layout == HAS_CPU_KERNEL
    _close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_out,n_in", [(100, 100), (64, 72), (130, 256)])
def test_int4_unpack_and_scale_path_matches_twin(dtype, n_out, n_in):
    # Shapes the kernel does not take (out % 64, in % 32) and fp16 go through unpack-and-scale.
    m = Int4Linear.from_float(torch.randn(n_out, n_in) * 0.05)
    x = torch.randn(7, n_in, dtype=dtype)
    ref = int4_linear_reference(x, m.weight_packed, m.weight_scale, m.weight_shape)
    y = m(x)
    assert not m.kernel_layout or dtype != torch.float16
    _close(y, ref, dtype)


def test_int4_kernel_path_against_an_independent_fp64_oracle():
    w = torch.randn(128, 128) * 0.05
    packed, scale = quantize_int4(w)
    p64 = packed.to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([((p64 >> (4 * k)) & 0xF) - 8 for k in range(8)], -1).flatten(-2).double()
    w_oracle = q * scale.double().repeat_interleave(32, -1)
    m = Int4Linear(128, 128)
    m.weight_packed.copy_(packed)
    m.weight_scale.copy_(scale)
    x = torch.randn(16, 128)
    torch.testing.assert_close(m(x).double(), x.double() @ w_oracle.T, rtol=1e-5, atol=1e-5)


def test_int4_module_state_dict_stays_in_checkpoint_layout_after_kernel_use():
    w = torch.randn(128, 256)
    packed, scale = quantize_int4(w)
    m = Int4Linear.from_float(w)
    x = torch.randn(3, 256)
    y = m(x)
    sd = m.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_shape"}
    assert torch.equal(sd["weight_packed"], packed) and torch.equal(sd["weight_scale"], scale)
    assert sd["weight_shape"].dtype == torch.int32 and sd["weight_shape"].tolist() == [128, 256]
    assert torch.equal(m.dequantize(torch.float32), dequantize_int4(packed, scale, (128, 256), torch.float32))
    # New data loaded into the same module, after kernel use, is read as checkpoint order.
    packed2, scale2 = quantize_int4(-w)
    m.load_state_dict({"weight_packed": packed2, "weight_scale": scale2, "weight_shape": sd["weight_shape"]})
    assert not m.kernel_layout
    torch.testing.assert_close(m(x), -y, rtol=1e-5, atol=1e-5)
    m.weight_packed = packed.clone()  # plain assignment, as a loader might do
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    m.float()  # a module transform goes back to checkpoint order first
    assert not m.kernel_layout and torch.equal(m.weight_packed, packed)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_int4_stacked_experts_quantise_and_run_per_expert():
    w = torch.randn(3, 64, 96) * 0.05
    packed, scale = quantize_int4(w)
    x = torch.randn(5, 96)
    refs = []
    for e in range(3):
        pe, se = quantize_int4(w[e])
        assert torch.equal(packed[e], pe) and torch.equal(scale[e], se)
        refs.append(int4_linear_reference(x, packed[e], scale[e], (64, 96)))
        _close(int4_linear(x, packed[e], scale[e], 96), refs[e], torch.float32)
    assert torch.equal(dequantize_int4(packed, scale, (64, 96), torch.float32)[1],
                       dequantize_int4(packed[1], scale[1], (64, 96), torch.float32))
    if int4_cpu_kernel_applies(packed, 96):
        to_cpu_kernel_layout_(packed)
        for e in range(3):
            _close(int4_linear(x, packed[e], scale[e], 96, kernel_layout=True), refs[e], torch.float32)


def test_int4_module_memory_is_under_30_percent_of_bf16_even_after_kernel_use():
    m = Int4Linear(2048, 1024)  # an expert of 2048 x 1024; bf16 would take 4 MiB
    bf16_bytes = 2048 * 1024 * 2
    assert _bytes(m) <= 0.30 * bf16_bytes
    m(torch.randn(1, 2048, dtype=torch.bfloat16))
    assert _bytes(m) <= 0.30 * bf16_bytes
    tensors = [v for v in vars(m).values() if torch.is_tensor(v)]
    assert tensors == []  # no hidden second copy outside the buffers


# Bad input

@pytest.mark.parametrize("call, match", [
    (lambda: quantize_fp8_block(torch.ones(4, 4, dtype=torch.int32)), "float tensor"),
    (lambda: quantize_fp8_block(torch.ones(8)), r"\[..., out, in\]"),
    (lambda: quantize_fp8_block(torch.tensor([[1.0, float("nan")]])), "inf or NaN"),
    (lambda: dequantize_fp8_block(torch.zeros(200, 300, dtype=torch.float8_e4m3fn), torch.ones(2, 2)), r"expected \[2, 3\]"),
    (lambda: dequantize_fp8_block(torch.zeros(4, 4), torch.ones(1, 1)), "float8_e4m3fn"),
    (lambda: dequantize_fp8_block(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.ones(1, 1, dtype=torch.bfloat16)),
     "float32"),
    (lambda: fp8_block_linear(torch.ones(1, 5), torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.ones(1, 1)),
     "5 features"),
    (lambda: pack_int4(torch.tensor([[8]])), r"\[-8, 7\]"),
    (lambda: pack_int4(torch.ones(2, 8)), "integer"),
    (lambda: unpack_int4(torch.zeros(2, 2, dtype=torch.int32), 20), "not 20"),
    (lambda: quantize_int4(torch.tensor([[float("inf")] * 32])), "inf or NaN"),
    (lambda: dequantize_int4(torch.zeros(4, 4, dtype=torch.int32), torch.ones(4, 2, dtype=torch.bfloat16), (5, 32)),
     "5 output rows"),
    (lambda: dequantize_int4(torch.zeros(4, 4, dtype=torch.int32), torch.ones(4, 2, dtype=torch.bfloat16), (4, 64)),
     "need 8"),
    (lambda: dequantize_int4(torch.zeros(4, 4, dtype=torch.int32), torch.ones(4, 3, dtype=torch.bfloat16), (4, 32)),
     r"expected \[4, 1\]"),
    (lambda: dequantize_int4(torch.zeros(4, 4), torch.ones(4, 1, dtype=torch.bfloat16), (4, 32)), "int32"),
    (lambda: int4_linear(torch.ones(1, 64, dtype=torch.float16), *quantize_int4(torch.randn(64, 64)), 64,
                         kernel_layout=True), "fp32/bf16"),
    (lambda: Int4Linear(0, 8), "positive"),
    (lambda: Fp8BlockLinear(8, -1), "positive"),
])
def test_bad_input_is_rejected_clearly(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_int4_module_rejects_a_weight_shape_that_does_not_match():
    m = Int4Linear(64, 32)
    m.weight_shape = torch.tensor([32, 60], dtype=torch.int32)
    with pytest.raises(ValueError, match="does not match"):
        m.dequantize()
