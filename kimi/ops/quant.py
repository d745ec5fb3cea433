"""Weight-only quantisation formats of the Kimi checkpoints: block FP8 (K2-Instruct) and INT4 W4A16
(K2-Thinking's routed experts). Quantise, dequantise, and linears that keep the weights quantised in memory.

The formats are specified in the project reference k2.md §5:
  block FP8   `weight` float8_e4m3fn [out, in] and `weight_scale_inv` fp32 [ceil(out/128), ceil(in/128)].
              W[i, j] = float(Wq[i, j]) * S[i // 128, j // 128]. It is a multiply, despite the name.
              S = block absmax / 448. Edge blocks are partial: the absmax is taken over the stored part only.
  INT4 W4A16  compressed-tensors "pack-quantized", symmetric, group 32:
                `weight_packed` int32 [out, ceil(in/8)]: 8 values per int32, lowest bits first along the
                  input dim, each stored as q + 8.
                `weight_scale` bf16 [out, ceil(in/32)] = group absmax / 7.
                `weight_shape` int32 [out, in].
              W[i, j] = q[i, j] * scale[i, j // 32].
              When in % 8 != 0 or in % 32 != 0 we pad the way the format does: the packed columns and the last
              group are padded, the padding nibbles are zero bits, and weight_shape strips them off again.
Every function takes leading dims, so stacked experts [E, out, in] work.

How the linears run:
  Fp8BlockLinear / fp8_block_linear work through 128 output rows (one scale block) at a time:
    - decode the FP8 bits to fp32 with integer shifts (exact, and far faster than torch's fp8 cast on CPU);
    - scale in fp32, cast to the activation dtype, matmul.
    Extra memory is one tile. The weights are bit-identical to the dequantise-then-linear twin's.
  Int4Linear / int4_linear use torch's CPU int4 weight-only kernel (_weight_int4pack_mm_for_cpu) on CPU.
    The kernel dequantises unsigned nibbles u as (u - 8) * scale + zero. Our stored nibble is u = q + 8, so
    zero = 0 gives exactly our symmetric q * scale.
    The kernel wants its own nibble order. That order is probed once, and the bytes are rewritten in place,
    so there is still a single copy of about 0.5 byte/weight plus bf16 scales.
    Anywhere else an unpack-and-scale path runs tile by tile: GPU, fp16, odd shapes, or an unknown kernel
    layout.
The plain twins (dequantise fully, then F.linear) are fp8_block_linear_reference and int4_linear_reference.
"""

import functools
import logging
import math
import sys
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("kimi")

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_BLOCK = 128
INT4_GROUP = 32
INT4_MAX = 7  # symmetric absmax maps to +-7; -8 decodes but is never produced

_TILE_ROWS = 256  # output rows dequantised at once on the unpack-and-scale paths
# FP8 e4m3 bits to fp32 bits: shift the sign-extended byte left by 20, then keep the sign (bit 31) and the
# 4 exponent + 3 mantissa bits (26..20). The result is the exact value times 2**-120 (subnormals included).
# Written as a signed int32: 0x87F00000 - 2**32.
_FP8_FP32_MASK = 0x87F00000 - (1 << 32)
_FP8_UNBIAS = 2.0**120


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _fp8_decode(w8: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> fp32 holding value * 2**-120. Exact for every finite code. NaN codes decode to +-480."""
    x = w8.view(torch.int8).to(torch.int32)
    return x.bitwise_left_shift_(20).bitwise_and_(_FP8_FP32_MASK).view(torch.float32)


def _check_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int) -> None:
    if weight.dtype != torch.float8_e4m3fn or weight.dim() < 2:
        raise ValueError(f"FP8 weight must be float8_e4m3fn [..., out, in], got {weight.dtype} {list(weight.shape)}")
    if scale_inv.dtype != torch.float32:
        raise ValueError(f"weight_scale_inv must be float32, got {scale_inv.dtype}")
    *lead, n_out, n_in = weight.shape
    want = [*lead, _ceil_div(n_out, block), _ceil_div(n_in, block)]
    if list(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv of shape {list(scale_inv.shape)} does not fit weight "
                         f"{list(weight.shape)} with {block}x{block} blocks: expected {want}")


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (float8_e4m3fn [..., out, in], fp32 scale_inv [..., ceil(out/b), ceil(in/b)]).
    Each scale is block absmax / 448, computed in float64 and then rounded once to fp32, so that
    re-quantising float64-dequantised weights gives back the same bytes. An all-zero block gets scale 1."""
    if not w.is_floating_point() or w.dim() < 2:
        raise ValueError(f"quantize_fp8_block expects a float tensor [..., out, in], got {w.dtype} {list(w.shape)}")
    if block < 1:
        raise ValueError(f"block must be a positive int, got {block}")
    *lead, n_out, n_in = w.shape
    rb, cb = _ceil_div(n_out, block), _ceil_div(n_in, block)
    wf = w.double() if w.dtype == torch.float64 else w.float()
    wf = F.pad(wf, (0, cb * block - n_in, 0, rb * block - n_out))  # zero padding leaves each absmax unchanged
    blocks = wf.view(*lead, rb, block, cb, block)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., rb, cb]
    if not torch.isfinite(amax).all():
        raise ValueError("quantize_fp8_block: weight contains inf or NaN")
    scale = (amax.double() / FP8_MAX).float().clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(*lead, rb * block, cb * block)[..., :n_out, :n_in].contiguous()
    return q, scale


def _fp8_rows(w8: torch.Tensor, srow: torch.Tensor) -> torch.Tensor:
    """One row block: float8 [r <= block, in] times fp32 [in] (S * 2**120, expanded) -> fp32 [r, in] = fl(q * S)."""
    return _fp8_decode(w8).mul_(srow)


def _fp8_scale_rows(scale_inv: torch.Tensor, n_in: int, block: int) -> tuple[torch.Tensor, float]:
    """[..., rb, cb] fp32 -> ([..., rb, in] fp32 S * 2**120 or S, the factor still owed to the decoded tile).
    Folding 2**120 into S saves a pass. The fold is exact (a power of two) unless S * 2**120 overflows,
    which needs S >= 256."""
    s = scale_inv.repeat_interleave(block, dim=-1)[..., :n_in]
    if s.numel() and s.abs().amax() >= 2.0**7:
        return s, _FP8_UNBIAS
    return s * _FP8_UNBIAS, 1.0


def dequantize_fp8_block(w8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         block: int = FP8_BLOCK) -> torch.Tensor:
    """float8 [..., out, in] and fp32 scale_inv -> dtype [..., out, in] = fl(float(Wq) * S), computed in fp32 (in
    float64 if dtype is float64) and rounded once to dtype. Works through one row block at a time."""
    _check_fp8(w8, scale_inv, block)
    *lead, n_out, n_in = w8.shape
    out = torch.empty(w8.shape, dtype=dtype, device=w8.device)
    w8f, sf, of = w8.reshape(-1, n_out, n_in), scale_inv.reshape(-1, *scale_inv.shape[-2:]), out.view(-1, n_out, n_in)
    if dtype == torch.float64:
        s = sf.double().repeat_interleave(block, -1)[..., :n_in].repeat_interleave(block, -2)[..., :n_out, :]
        of.copy_((_fp8_decode(w8f).double() * _FP8_UNBIAS) * s)
        return out
    srows, owed = _fp8_scale_rows(sf, n_in, block)
    for e in range(w8f.shape[0]):
        for rb, r0 in enumerate(range(0, n_out, block)):
            tile = _fp8_rows(w8f[e, r0:r0 + block], srows[e, rb])
            of[e, r0:r0 + block] = tile.mul_(owed) if owed != 1.0 else tile
    return out


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     block: int = FP8_BLOCK) -> torch.Tensor:
    """x [..., in] @ dequant(weight [out, in]).T -> [..., out] in x's dtype. One 128-row block is dequantised at a
    time, so the largest temporary is [128, in] fp32."""
    _check_fp8(weight, weight_scale_inv, block)
    if weight.dim() != 2:
        raise ValueError(f"fp8_block_linear takes one weight [out, in]; index stacked experts first, got "
                         f"{list(weight.shape)}")
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"input has {x.shape[-1]} features, weight expects {n_in}")
    x2 = x.reshape(-1, n_in)
    y = x2.new_empty(x2.shape[0], n_out)
    srows, owed = _fp8_scale_rows(weight_scale_inv, n_in, block)
    for rb, r0 in enumerate(range(0, n_out, block)):
        tile = _fp8_rows(weight[r0:r0 + block], srows[rb])
        if owed != 1.0:
            tile.mul_(owed)
        y[:, r0:r0 + block] = F.linear(x2, tile.to(x.dtype))
    return y.view(*x.shape[:-1], n_out)


def fp8_block_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                               block: int = FP8_BLOCK) -> torch.Tensor:
    """The plain twin: dequantise the whole weight, then F.linear."""
    return F.linear(x, dequantize_fp8_block(weight, weight_scale_inv, x.dtype, block))


class Fp8BlockLinear(nn.Module):
    """Linear without bias. It keeps the K2-Instruct tensors under their checkpoint names:
    `weight` (float8_e4m3fn [out, in], a frozen Parameter) and `weight_scale_inv` (fp32 buffer)."""

    quantized = True  # Transformer.cast leaves its tensors' dtypes alone

    def __init__(self, in_features: int, out_features: int, block: int = FP8_BLOCK, device=None):
        super().__init__()
        if min(in_features, out_features, block) < 1:
            raise ValueError(f"Fp8BlockLinear needs positive sizes, got in={in_features} out={out_features} "
                             f"block={block}")
        self.in_features, self.out_features, self.block = in_features, out_features, block
        w = torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        shape = (_ceil_div(out_features, block), _ceil_div(in_features, block))
        self.register_buffer("weight_scale_inv", torch.ones(shape, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, weight: torch.Tensor, block: int = FP8_BLOCK) -> "Fp8BlockLinear":
        if weight.dim() != 2:
            raise ValueError(f"from_float expects a weight [out, in], got {list(weight.shape)}")
        m = cls(weight.shape[1], weight.shape[0], block, device=weight.device)
        q, s = quantize_fp8_block(weight, block)
        m.weight.data.copy_(q)
        m.weight_scale_inv.copy_(s)
        return m

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_fp8_block(self.weight, self.weight_scale_inv, dtype, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_block_linear(x, self.weight, self.weight_scale_inv, self.block)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 block={self.block}"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int [..., n] with values in [-8, 7] -> int32 [..., ceil(n/8)]. Element k of each group of 8 sits in
    bits 4k..4k+3 as q + 8. The padding nibbles are zero bits."""
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"pack_int4 expects an integer tensor, got {q.dtype}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"pack_int4 values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    if sys.byteorder != "little":
        raise RuntimeError("pack_int4 reads int32 as 4 little-endian bytes")
    n = q.shape[-1]
    u = F.pad((q + 8).to(torch.uint8), (0, 8 * _ceil_div(n, 8) - n))
    # Bytes hold elements (2j, 2j+1) low nibble first. On a little-endian machine, byte b of an int32 is bits
    # 8b..8b+7, so viewing the bytes as int32 puts element k at bits 4k..4k+3.
    return (u[..., 0::2] | (u[..., 1::2] << 4)).view(torch.int32)


def _unpack_u4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., m] -> uint8 [..., 8m] of the stored nibbles (q + 8)."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack((b & 15, b >> 4), dim=-1).flatten(-2)


def unpack_int4(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """int32 [..., m] -> int8 [..., n] of values q in [-8, 7]. n defaults to 8m; anything beyond it is padding."""
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int4 expects int32 packed values, got {packed.dtype}")
    n = 8 * packed.shape[-1] if n is None else n
    if not 8 * packed.shape[-1] - 8 < n <= 8 * packed.shape[-1]:
        raise ValueError(f"{packed.shape[-1]} packed int32 columns hold {8 * packed.shape[-1] - 7}.."
                         f"{8 * packed.shape[-1]} values, not {n}")
    return (_unpack_u4(packed)[..., :n].to(torch.int8) - 8)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (weight_packed int32 [..., out, ceil(in/8)], weight_scale bf16
    [..., out, ceil(in/group)]). scale = bf16(group absmax / 7); q = round(w / scale) clamped to [-8, 7].
    An all-zero group gets scale 1."""
    if not w.is_floating_point() or w.dim() < 2:
        raise ValueError(f"quantize_int4 expects a float tensor [..., out, in], got {w.dtype} {list(w.shape)}")
    if group < 1:
        raise ValueError(f"group must be a positive int, got {group}")
    n_in = w.shape[-1]
    ng = _ceil_div(n_in, group)
    g = F.pad(w.float(), (0, ng * group - n_in)).unflatten(-1, (ng, group))  # [..., out, ng, group]
    amax = g.abs().amax(-1)
    if not torch.isfinite(amax).all():
        raise ValueError("quantize_int4: weight contains inf or NaN")
    scale = (amax / INT4_MAX).to(torch.bfloat16).clamp_min(torch.finfo(torch.bfloat16).tiny)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    # Divide by the stored (bf16-rounded) scale, so that dequantise(quantise(w)) uses the same scale.
    q = torch.round(g / scale.float()[..., None]).clamp_(-8, INT4_MAX).flatten(-2)[..., :n_in]
    return pack_int4(q.to(torch.int8)), scale


def _check_int4(packed: torch.Tensor, scale: torch.Tensor, n_in: int, group: int) -> None:
    if packed.dtype != torch.int32 or packed.dim() < 2:
        raise ValueError(f"weight_packed must be int32 [..., out, in/8], got {packed.dtype} {list(packed.shape)}")
    if scale.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"weight_scale must be bf16 (or fp16/fp32), got {scale.dtype}")
    *lead, n_out, m = packed.shape
    if m != _ceil_div(n_in, 8):
        raise ValueError(f"weight_packed has {m} columns; {n_in} input features need {_ceil_div(n_in, 8)}")
    want = [*lead, n_out, _ceil_div(n_in, group)]
    if list(scale.shape) != want:
        raise ValueError(f"weight_scale of shape {list(scale.shape)} does not fit weight_packed "
                         f"{list(packed.shape)} (in={n_in}, group {group}): expected {want}")


def _shape_in(shape, packed: torch.Tensor) -> int:
    """Input width from a weight_shape tensor or an (out, in) pair, checked against weight_packed."""
    out_f, in_f = (int(v) for v in (shape.tolist() if torch.is_tensor(shape) else shape))
    if out_f != packed.shape[-2]:
        raise ValueError(f"weight_shape says {out_f} output rows, weight_packed has {packed.shape[-2]}")
    return in_f


def _int4_rows(packed: torch.Tensor, scale: torch.Tensor, n_in: int, group: int) -> torch.Tensor:
    """[r, in/8] int32 and [r, in/group] scales -> fp32 [r, in] = q * scale."""
    q = _unpack_u4(packed)[..., :n_in].to(torch.float32).sub_(8)
    return q.mul_(scale.float().repeat_interleave(group, dim=-1)[..., :n_in])


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, shape, dtype: torch.dtype = torch.bfloat16,
                    group: int = INT4_GROUP) -> torch.Tensor:
    """weight_packed [..., out, ceil(in/8)], weight_scale [..., out, ceil(in/group)], weight_shape (out, in)
    -> dtype [..., out, in] = fl(q * scale). The product is exact in fp32 and rounded once to dtype."""
    n_in = _shape_in(shape, packed)
    _check_int4(packed, scale, n_in, group)
    out = torch.empty(*packed.shape[:-1], n_in, dtype=dtype, device=packed.device)
    p2, s2, o2 = packed.reshape(-1, packed.shape[-1]), scale.reshape(-1, scale.shape[-1]), out.view(-1, n_in)
    for r0 in range(0, p2.shape[0], _TILE_ROWS):
        o2[r0:r0 + _TILE_ROWS] = _int4_rows(p2[r0:r0 + _TILE_ROWS], s2[r0:r0 + _TILE_ROWS], n_in, group)
    return out


@functools.cache
def _cpu_kernel_block_n() -> int | None:
    """Rows per block of the nibble layout that torch's CPU int4 kernel expects.
    Inside a block of bn rows, each byte pairs row j (low nibble) with row j + bn/2 (high nibble), for one
    input column k. The blocks are laid out [N/bn, K, bn/2]. bn depends on the CPU's vector width, so we
    convert a probe with torch and keep whichever bn reproduces it. None means the layout is unknown, and
    the unpack-and-scale path is used instead."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
    try:
        ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).flatten()
    except (AttributeError, RuntimeError) as e:
        log.info("int4: torch has no usable CPU int4 kernel (%s); using unpack-and-scale", e)
        return None
    for bn in (64, 32, 16, 8):
        if torch.equal(_nibbles_to_cpu_kernel(probe.to(torch.uint8), bn), ref):
            log.info("int4: torch CPU int4 kernel, %d-row nibble blocks", bn)
            return bn
    log.warning("int4: torch's CPU int4 layout is not one we know; using unpack-and-scale")
    return None


def _nibbles_to_cpu_kernel(u: torch.Tensor, bn: int) -> torch.Tensor:
    """uint8 [N, K] nibbles -> flat uint8 [N*K/2] in the kernel's [N/bn, K, bn/2] byte layout."""
    n, k = u.shape
    u = u.view(n // bn, 2, bn // 2, k)
    return (u[:, 0] | (u[:, 1] << 4)).transpose(1, 2).flatten()


def _cpu_kernel_to_nibbles(b: torch.Tensor, n: int, k: int, bn: int) -> torch.Tensor:
    """Flat uint8 [N*K/2] in kernel layout -> uint8 [N, K] nibbles."""
    b = b.view(n // bn, k, bn // 2).transpose(1, 2)  # [N/bn, bn/2, K]
    return torch.stack((b & 15, b >> 4), dim=1).reshape(n, k)


def int4_cpu_kernel_applies(packed: torch.Tensor, n_in: int, group: int = INT4_GROUP) -> bool:
    """True if torch's CPU int4 kernel can run this weight (the layout is known, out % bn == 0, in % group
    == 0, group in {32, 64, 128}, on CPU). Activations must also be fp32 or bf16; that is checked per call."""
    bn = _cpu_kernel_block_n()
    return (bn is not None and packed.device.type == "cpu" and packed.shape[-2] % bn == 0
            and n_in % group == 0 and group in (32, 64, 128) and packed.is_contiguous())


def to_cpu_kernel_layout_(packed: torch.Tensor) -> torch.Tensor:
    """Rewrite weight_packed [..., out, in/8] (in % 8 == 0) from the checkpoint nibble order into the CPU
    kernel's, in place. Works one group of row blocks at a time, so the extra memory is about 2 MB."""
    return _relayout_(packed, to_kernel=True)


def to_checkpoint_layout_(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of to_cpu_kernel_layout_, also in place."""
    return _relayout_(packed, to_kernel=False)


def _relayout_(packed: torch.Tensor, to_kernel: bool) -> torch.Tensor:
    bn = _cpu_kernel_block_n()
    n_out, m = packed.shape[-2:]
    if bn is None or n_out % bn or not packed.is_contiguous() or packed.dtype != torch.int32:
        raise ValueError(f"weight_packed {packed.dtype} {list(packed.shape)} cannot take the CPU int4 kernel "
                         f"layout (needs contiguous int32 with out a multiple of {bn})")
    rows = packed.view(-1, m)
    step = bn * max(1, (1 << 21) // (bn * 4 * m))
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0:r0 + step]  # whole row blocks: their bytes are contiguous in both layouts
        n, b = chunk.shape[0], chunk.view(torch.uint8).view(-1)
        if to_kernel:
            new = _nibbles_to_cpu_kernel(_unpack_u4(chunk), bn)
        else:
            u = _cpu_kernel_to_nibbles(b, n, 8 * m, bn)
            new = (u[:, 0::2] | (u[:, 1::2] << 4)).flatten()
        b.copy_(new)
    return packed


def _kernel_scales_and_zeros(weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight_scale [out, G] -> the kernel's [G, out, (scale, zero = 0)] in dtype (fp32 or bf16).
    It is built on every call. It is 1/4 the size of the packed weight, so keeping it would push INT4 memory
    from 28% to 31% of bf16. Int4Linear keeps weight_scale as a transposed view, which makes .t() below free.
    After that, bf16 scales go in with integer ops only: a little-endian (scale, 0) pair of bf16 is one
    int32, and a bf16 is the top half of the fp32 with the same value."""
    s = weight_scale.t().contiguous()  # [G, out]
    g, n = s.shape
    if s.dtype != torch.bfloat16 or sys.byteorder != "little":
        return torch.stack((s.to(dtype), torch.zeros(g, n, dtype=dtype)), dim=-1)
    bits = s.view(torch.int16)
    if dtype == torch.bfloat16:
        return bits.to(torch.int32).bitwise_and_(0xFFFF).view(torch.bfloat16).view(g, n, 2)
    return bits.to(torch.int64).bitwise_and_(0xFFFF).bitwise_left_shift_(16).view(torch.float32).view(g, n, 2)


def int4_linear(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, in_features: int,
                group: int = INT4_GROUP, kernel_layout: bool = False) -> torch.Tensor:
    """x [..., in] @ dequant(weight_packed [out, in/8], weight_scale [out, in/group]).T -> [..., out].
    With kernel_layout=True, weight_packed is in the CPU kernel's order (see to_cpu_kernel_layout_), and
    torch's int4 kernel runs. It needs x on CPU in fp32 or bf16. Otherwise weight_packed is in checkpoint
    order and is unpacked and scaled 256 rows at a time. For stacked experts, pass packed[e] and scale[e].
    The kernel path is quickest when weight_scale is a transposed view (strides (1, out)); see Int4Linear."""
    if weight_packed.dim() != 2:
        raise ValueError(f"int4_linear takes one weight [out, in/8]; index stacked experts first, got "
                         f"{list(weight_packed.shape)}")
    _check_int4(weight_packed, weight_scale, in_features, group)
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, weight expects {in_features}")
    n_out = weight_packed.shape[0]
    x2 = x.reshape(-1, in_features)
    if kernel_layout:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the CPU int4 kernel takes fp32/bf16 activations on CPU, got {x.dtype} on {x.device}")
        if not int4_cpu_kernel_applies(weight_packed, in_features, group):
            raise ValueError(f"the CPU int4 kernel cannot run weight {list(weight_packed.shape)} "
                             f"(in={in_features}, group={group})")
        sz = _kernel_scales_and_zeros(weight_scale, x.dtype)
        w = weight_packed.view(torch.uint8)  # [out, in/2]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w, group, sz)
    else:
        y = x2.new_empty(x2.shape[0], n_out)
        for r0 in range(0, n_out, _TILE_ROWS):
            w = _int4_rows(weight_packed[r0:r0 + _TILE_ROWS], weight_scale[r0:r0 + _TILE_ROWS], in_features, group)
            y[:, r0:r0 + _TILE_ROWS] = F.linear(x2, w.to(x.dtype))
    return y.view(*x.shape[:-1], n_out)


def int4_linear_reference(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                          weight_shape, group: int = INT4_GROUP) -> torch.Tensor:
    """The plain twin: dequantise the whole weight, then F.linear."""
    return F.linear(x, dequantize_int4(weight_packed, weight_scale, weight_shape, x.dtype, group))


class Int4Linear(nn.Module):
    """Linear without bias, with K2-Thinking's expert tensors as buffers under their checkpoint names:
    `weight_packed` int32 [out, ceil(in/8)], `weight_scale` bf16 [out, ceil(in/32)], `weight_shape` int32 [2].

    The first CPU forward that torch's int4 kernel can serve rewrites weight_packed's bytes in place into the
    kernel's nibble order. This keeps one copy in memory.
    - state_dict() still writes the checkpoint order, and dequantize() reads either order.
    - Moving the module (.to / .cuda) restores the checkpoint order first.
    - weight_scale keeps its values and shape, but is then stored column-major, as a transposed view. This
      saves a transpose on every call; state_dict() writes it contiguous.
    - Loading new data into weight_packed, by copy_ or by assignment, is seen as checkpoint order. The
      kernel order is recognised only by the exact tensor object and version it produced.
    So a loader can fill the three buffers by name at any time. Direct reads of module.weight_packed after a
    CPU forward see the kernel's order (see kernel_layout)."""

    quantized = True  # Transformer.cast leaves its tensors' dtypes alone

    def __init__(self, in_features: int, out_features: int, group_size: int = INT4_GROUP, device=None):
        super().__init__()
        if min(in_features, out_features, group_size) < 1:
            raise ValueError(f"Int4Linear needs positive sizes, got in={in_features} out={out_features} "
                             f"group={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        kw = dict(device=device)
        self.register_buffer("weight_packed", torch.zeros(out_features, _ceil_div(in_features, 8), dtype=torch.int32, **kw))
        self.register_buffer("weight_scale", torch.ones(out_features, _ceil_div(in_features, group_size),
                                                        dtype=torch.bfloat16, **kw))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int32, **kw))
        self._kernel_ref, self._kernel_version = None, None

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = INT4_GROUP) -> "Int4Linear":
        if weight.dim() != 2:
            raise ValueError(f"from_float expects a weight [out, in], got {list(weight.shape)}")
        m = cls(weight.shape[1], weight.shape[0], group_size, device=weight.device)
        m.weight_packed, m.weight_scale = quantize_int4(weight, group_size)
        return m

    @property
    def kernel_layout(self) -> bool:
        """True while weight_packed holds the exact bytes this module rewrote into the CPU kernel's order."""
        t = self.weight_packed
        return self._kernel_ref is not None and self._kernel_ref() is t and t._version == self._kernel_version

    def _set_layout(self, kernel: bool) -> None:
        if kernel == self.kernel_layout:
            return
        (to_cpu_kernel_layout_ if kernel else to_checkpoint_layout_)(self.weight_packed)
        t = self.weight_packed
        self._kernel_ref, self._kernel_version = (weakref.ref(t), t._version) if kernel else (None, None)
        if kernel:
            # The same values, stored column-major: the kernel wants the scales as [G, out].
            self.weight_scale = self.weight_scale.t().contiguous().t()

    def _check_shape(self) -> None:
        got = [int(v) for v in self.weight_shape.tolist()]
        if got != [self.out_features, self.in_features]:
            raise ValueError(f"weight_shape {got} does not match Int4Linear(in={self.in_features}, "
                             f"out={self.out_features})")

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        self._check_shape()
        packed = self.weight_packed
        if self.kernel_layout:
            packed = to_checkpoint_layout_(packed.clone())
        return dequantize_int4(packed, self.weight_scale, self.weight_shape, dtype, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_kernel = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                      and int4_cpu_kernel_applies(self.weight_packed, self.in_features, self.group_size))
        if use_kernel or self.kernel_layout:
            self._set_layout(use_kernel)
        return int4_linear(x, self.weight_packed, self.weight_scale, self.in_features, self.group_size,
                           kernel_layout=use_kernel)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.weight_scale.is_contiguous():
            destination[prefix + "weight_scale"] = self.weight_scale.detach().contiguous()
        if self.kernel_layout:
            destination[prefix + "weight_packed"] = to_checkpoint_layout_(self.weight_packed.detach().clone())

    def _apply(self, fn, recurse=True):
        # A device move copies the bytes but not the layout stamp, so go back to checkpoint order first.
        if self.kernel_layout:
            self._set_layout(False)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}"
