"""kimi's C kernels for CPU decode (cpu_kernels.c, built on first use).

Batch-1 decode streams every weight from memory once per token, so its speed is the speed of y = x W^T for one
row of x. On this project's dev CPU (AMD EPYC, AVX-512) one core reads ~26 GB/s, torch's bf16 `F.linear` reaches
~8 GB/s there and oneDNN's prepacked weights 11-16 GB/s (kimi/ops/packed_linear.py); `gemv` streams the weight
row by row at 17-24 GB/s (bench/decode_kernels.py measures all three). It computes any number of rows of x
correctly but is the fast kernel for one: it reads each weight row once and converts it again for every row of x,
so from two rows on oneDNN's blocked GEMM wins, and packed_linear.py sends only single rows here.

The rest of a decode step is many small torch ops at a few microseconds each, which at bench size added up to as
much as the weights' streaming. The largest groups become one call each: `mla_decode`, MLA's absorbed attention for
a batch of single-token queries (four tiny bf16 batched matmuls at ~25 us each in torch, plus the glue; ops/
attention.py's torch path is its twin); `rms_norm`; `swiglu`, one token through an expert or shared MLP and, for
routed experts, its weighted add; `route_one`, the router's scores, grouped top-k and weights; `mla_project_one`,
the norm, rotations and latent of MLA's projections for one token; `kda_decode`, a KDA layer's work between its
projections and o_proj for single tokens (short conv, gate, delta rule, gated norm: ~40 torch ops), reading and
updating each sequence's window and state in place in the engine's pools. Each rounds to bf16 where the torch path
rounds (tests/test_cpu_kernels.py holds them to it).

Two serve prefill: `mla_prefill`, MLA's expanded attention of a chunk as flash attention in bf16 pair products
(where the CPU has AVX512-BF16; ~2.4x torch's SDPA at bench size), and `moe_combine`, the weighted sum of a MoE
block's expert outputs per token, bitwise the torch expression without its [M, D] temporaries. One serves both:
`moe_experts`, a MoE block's routed experts and their weighted sum for any number of tokens in one call, on
tile-major pair layouts of the weights (`expert_tiles`; AVX512-BF16): 1.2-1.8x oneDNN's per-expert products from
4 to 1,024 tokens at bench size, with no Python loop over experts.

The kernels are plain C with AVX-512 intrinsics and no torch headers: gcc builds them in about a second into the
user's cache directory ($KIMI_CACHE_DIR, else $XDG_CACHE_HOME/kimi, else ~/.cache/kimi), keyed by the source's
hash, and ctypes loads them (calls release the GIL). Where there is no compiler, no AVX-512, or the build fails,
`available()` is False and callers keep their torch paths; `KIMI_CPU_KERNELS=0` turns them off. The choice is made
once per process and logged (logger "kimi").

fp32 models, which is what CPUs without native bf16 compute, have their kernels in cpu_kernels_fp32.c (AVX2 + FMA,
so they run without AVX-512 too; built and loaded the same way; `fp32_available()`). Their weights are read from
bf16 copies of bf16-exact fp32 weights (kimi/ops/bf16_weights.py): `gemv_fp32` (any number of rows: streamed
row by row for a few, register tiles for a decode batch), `mla_decode_fp32`, `swiglu_fp32`,
`mla_project_x_fp32` (all of MLA.project for one token, its products included) and `moe_one_fp32` (a whole MoE block
for one token); `rms_norm`, `route_one`, `mla_project_one` and `kda_decode` take either dtype (`runs(dtype)` says
where). All compute in fp32 and differ from the torch paths only in summation order (tests/test_bf16_weights.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("kimi")
_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp", "-shared", "-fPIC"]
_FP32_SOURCE = Path(__file__).with_name("cpu_kernels_fp32.c")  # fp32 models, bf16 weights: AVX2 + FMA
_FP32_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    if os.environ.get("KIMI_CACHE_DIR"):
        return Path(os.environ["KIMI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kimi"


def _build(source: Path, flags: list[str]) -> Path:
    src = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # + headers
    key = hashlib.sha256(src + " ".join(flags).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"{source.stem}-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)  # built aside, then renamed: processes may race
        os.close(fd)
        try:
            subprocess.run([os.environ.get("CC", "gcc"), *flags, str(source), "-o", tmp], check=True,
                           capture_output=True, timeout=120)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def _load(what: str, source: Path, flags: list[str], supported: str, lacks: str) -> ctypes.CDLL | None:
    """Build and load `source`, or None where it is turned off, does not build, or the CPU lacks what it needs
    (the library's `supported` function says); logged either way."""
    if os.environ.get("KIMI_CPU_KERNELS", "1") == "0":
        log.info("%s: off (KIMI_CPU_KERNELS=0); torch paths", what)
        return None
    try:
        path = _build(source, flags)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.info("%s: not built (%s); torch paths", what, e)
        return None
    if not getattr(lib, supported)():
        log.info("%s: this CPU lacks %s; torch paths", what, lacks)
        return None
    log.info("%s: %s", what, path)
    return lib


_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
# kernels both libraries have, with one signature: kimi_<name>_bf16 (cpu_kernels.c), kimi_<name>_f32 (the fp32 one)
_BOTH = {
    "rmsnorm": ([_ptr, _i64, _i64, _ptr, _f32, _ptr], None),
    "mla_project_one": ([_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _f32, _ptr, _ptr, _ptr, _ptr], None),
    "route_one": ([_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _f32, _ptr, _ptr], None),
    "kda_decode": ([_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _f32, _ptr, _ptr, _ptr, _i64, _i64, _i64,
                    _i64, _i64, _ptr, _int], _int),
}


def _declare(lib: ctypes.CDLL, suffix: str, own: dict[str, tuple]) -> ctypes.CDLL:
    """Set argtypes and restype of the _BOTH kernels (named with `suffix`) and of the library's `own` ones."""
    for name, (args, result) in {**{f"kimi_{n}_{suffix}": sig for n, sig in _BOTH.items()}, **own}.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (decided once per process, and logged)."""
    lib = _load("kimi's C CPU kernels", _SOURCE, _FLAGS, "kimi_cpu_kernels_supported", "AVX-512 (F, BW, VL)")
    return lib and _declare(lib, "bf16", {
        "kimi_gemv_bf16": ([_ptr, _i64, _i64, _ptr, _i64, _ptr, _int], _int),
        "kimi_mla_decode_bf16": ([_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64,
                                  _f32, _ptr, _int], _int),
        "kimi_mla_prefill_bf16": ([_ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _ptr,
                                   _int], _int),
        "kimi_mla_decode_pairs": ([_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _i64,
                                   _i64, _f32, _ptr, _int], _int),
        "kimi_swiglu_one_bf16": ([_ptr, _i64, _ptr, _ptr, _i64, _f32, _ptr, _ptr, _int], _int),
        "kimi_moe_combine_bf16": ([_ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _int], _int),
        "kimi_add_bf16": ([_ptr, _ptr, _i64, _ptr], None),
        "kimi_rmsnorm_rows_bf16": ([_ptr, _i64, _i64, _ptr, _f32, _ptr, _int], None),
        "kimi_moe_experts_pairs": ([_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _ptr, _int], _int),
    })


def available() -> bool:
    """True where the kernels run: a CPU with AVX-512 (F, BW, VL) and a C compiler that built cpu_kernels.c."""
    return _library() is not None


@functools.cache
def _fp32_library() -> ctypes.CDLL | None:
    """The fp32 models' kernels (cpu_kernels_fp32.c), or None; decided once per process, and logged."""
    lib = _load("kimi's fp32 CPU kernels", _FP32_SOURCE, _FP32_FLAGS, "kimi_fp32_kernels_supported", "AVX2 + FMA")
    return lib and _declare(lib, "f32", {
        "kimi_gemv_f32_bf16w": ([_ptr, _i64, _i64, _ptr, _i64, _ptr, _int], None),
        "kimi_mla_decode_f32": ([_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64,
                                 _f32, _ptr, _int], _int),
        "kimi_swiglu_f32": ([_ptr, _i64, _ptr, _ptr, _i64, _f32, _ptr, _ptr], _int),
        "kimi_mla_project_x_f32": ([_ptr, _i64, _ptr, _i64, _ptr, _f32, _ptr, _i64, _i64, _i64, _i64, _ptr, _f32, _ptr,
                                    _ptr, _ptr, _ptr, _ptr], _int),
        "kimi_moe_one_f32": ([_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _f32, _ptr, _ptr, _i64, _ptr, _ptr,
                              _i64, _ptr], _int),
    })


def fp32_available() -> bool:
    """True where gemv_fp32 runs: a CPU with AVX2 + FMA and a C compiler that built cpu_kernels_fp32.c."""
    return _fp32_library() is not None


def runs(dtype: torch.dtype) -> bool:
    """True where the one-row kernels for tensors of `dtype` run: bf16 (cpu_kernels.c) or fp32 (cpu_kernels_fp32.c)."""
    return available() if dtype == torch.bfloat16 else fp32_available() if dtype == torch.float32 else False


def _library_for(dtype: torch.dtype) -> ctypes.CDLL:
    """The library whose kernels take `dtype` (bf16 or fp32) tensors; RuntimeError where it does not run."""
    if dtype == torch.float32:
        if _fp32_library() is None:
            raise RuntimeError("kimi's fp32 kernels are not available here (they need AVX2 + FMA and a C compiler)")
        return _fp32_library()
    return _loaded()


def gemv_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] fp32 on the CPU, weight [N, K] bf16 contiguous -> x W^T [..., N] fp32: the fp32 product with the
    weight widened from bf16 (exact), summed in fp32. For fp32 models whose weights are bf16-representable
    (packed_linear.py keeps such a copy): half the bytes of an fp32 weight to stream per token."""
    lib = _library_for(torch.float32)
    N, K = weight.shape
    if (x.shape[-1] != K or x.dtype != torch.float32 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
            or weight.device.type != "cpu" or not weight.is_contiguous()):
        raise ValueError(f"gemv_fp32 wants x [..., K] fp32 and a contiguous bf16 weight [N, K], both on the CPU; got "
                         f"x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} {weight.dtype} on "
                         f"{weight.device}")
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], N)
    lib.kimi_gemv_f32_bf16w(x.data_ptr(), x.numel() // K, K, weight.data_ptr(), N, y.data_ptr(),
                            torch.get_num_threads())
    return y


def _context(rows: torch.Tensor | slice, lengths: torch.Tensor):
    """The attention kernels' context arguments: int64 lengths and rows (kept alive by the caller), the rows'
    pointer (None for a slice), the slice's first row, and S (the rows per sequence)."""
    lengths = lengths.to(torch.int64).contiguous()
    if isinstance(rows, slice):
        return lengths, rows, None, rows.start, rows.stop - rows.start
    rows = rows.to(torch.int64).contiguous()
    return lengths, rows, rows.data_ptr(), 0, rows.shape[1]


def mla_decode_fp32(mla, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor | slice,
                    lengths: torch.Tensor) -> torch.Tensor:
    """mla_decode for fp32 models: the same arguments and result in fp32, with kv_b_proj's bf16 copy
    (mla.kv_b_proj.plain, kimi/ops/bf16_weights.py) standing for its bf16-exact weight."""
    lib = _library_for(torch.float32)
    B, _, H, nope = q_nope.shape
    weight = getattr(mla.kv_b_proj, "plain", None)
    if weight is None:
        raise RuntimeError("mla_decode_fp32 needs a bf16 copy of kv_b_proj's weight (kimi/ops/bf16_weights.py)")
    if not (q_nope.dtype == q_pe.dtype == cache.dtype == torch.float32 and cache.is_contiguous()
            and cache.device.type == "cpu"):
        raise ValueError("mla_decode_fp32 wants fp32 CPU tensors with a contiguous cache")
    q_nope, q_pe = q_nope.contiguous(), q_pe.contiguous()
    lengths, rows, rows_ptr, start, S = _context(rows, lengths)
    out = q_nope.new_empty(B, 1, H, mla.v_head_dim)
    if lib.kimi_mla_decode_f32(q_nope.data_ptr(), q_pe.data_ptr(), weight.data_ptr(), cache.data_ptr(), rows_ptr,
                               start, lengths.data_ptr(), B, S, H, nope, mla.qk_rope_head_dim, mla.v_head_dim,
                               mla.kv_lora_rank, mla.scale, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("mla_decode_fp32 could not allocate its scratch memory")
    return out


def swiglu_fp32(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weight: float = 1.0,
                total: torch.Tensor | None = None) -> torch.Tensor | None:
    """One fp32 token through a SwiGLU MLP whose weights are bf16 copies, in one call: x [1, D] fp32, gate_up
    [2I, D] bf16 (gate rows, then up rows), down [D, I] bf16 -> down(silu(gate x) * up x) [1, D] fp32; with total
    ([1, D] fp32, contiguous), adds weight times that to total in place instead and returns None."""
    lib = _library_for(torch.float32)
    D, I = down.shape
    if not (x.numel() == D and x.dtype == torch.float32 and gate_up.shape == (2 * I, D)
            and gate_up.dtype == down.dtype == torch.bfloat16 and gate_up.is_contiguous() and down.is_contiguous()
            and (total is None or (total.numel() == D and total.dtype == torch.float32 and total.is_contiguous()))):
        raise ValueError("swiglu_fp32 wants x [1, D] fp32, contiguous bf16 gate_up [2I, D] and down [D, I], and an "
                         "fp32 contiguous total [1, D] or None")
    x = x.contiguous()
    out = None if total is not None else x.new_empty(1, D)
    if lib.kimi_swiglu_f32(x.data_ptr(), D, gate_up.data_ptr(), down.data_ptr(), I, weight,
                           None if total is None else total.data_ptr(), None if out is None else out.data_ptr()):
        raise MemoryError("swiglu_fp32 could not allocate its scratch memory")
    return out


def mla_project_x_fp32(mla, x: torch.Tensor, in_weight: torch.Tensor, cos: torch.Tensor | None,
                       sin: torch.Tensor | None):
    """model/mla.py's MLA.project for one fp32 token, from the layer input x [D] in one call: in_weight [n_q + r +
    rope, D] bf16 is q_a_proj's (K2) or q_proj's rows stacked on kv_a_proj_with_mqa's (bf16 copies); K2's q_b_proj
    reads its copy mla.q_b_proj.plain. cos/sin [rope / 2] fp32 (None: NoPE) -> q_nope [1, 1, H, nope], q_pe [1, 1,
    H, rope], latent [1, 1, r + rope], as mla_project_one returns them."""
    lib = _library_for(torch.float32)
    H, nope, rope, r = mla.num_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    n_q = in_weight.shape[0] - r - rope
    q_lora = hasattr(mla, "q_b_proj")
    q_b = mla.q_b_proj.plain if q_lora else None
    D = in_weight.shape[1]
    if not (x.numel() == D and x.dtype == torch.float32 and in_weight.dtype == torch.bfloat16
            and in_weight.is_contiguous() and (n_q == H * (nope + rope) if not q_lora else q_b is not None
                                               and q_b.shape == (H * (nope + rope), n_q) and q_b.is_contiguous())
            and (cos is None or (cos.dtype == sin.dtype == torch.float32 and cos.numel() == sin.numel() == rope // 2))):
        raise ValueError(f"mla_project_x_fp32 wants one fp32 token of {D} values, a contiguous bf16 input weight "
                         f"[n_q + {r + rope}, D] (and q_b_proj's bf16 copy [{H * (nope + rope)}, n_q] for a low-rank "
                         f"q) and fp32 cos/sin [{rope // 2}]; got x {tuple(x.shape)} {x.dtype}, weight "
                         f"{tuple(in_weight.shape)} {in_weight.dtype}")
    x = x.contiguous()
    q = x.new_empty(1, 1, H, nope + rope)
    q_pe = x.new_empty(1, 1, H, rope)
    latent = x.new_empty(1, 1, r + rope)
    q_norm = mla.q_a_layernorm if q_lora else None
    if cos is not None:
        cos, sin = cos.contiguous(), sin.contiguous()
    if lib.kimi_mla_project_x_f32(x.data_ptr(), D, in_weight.data_ptr(), n_q,
                                  q_norm.weight.data_ptr() if q_lora else None, q_norm.eps if q_lora else 0.0,
                                  q_b.data_ptr() if q_lora else None, H, nope, rope, r,
                                  mla.kv_a_layernorm.weight.data_ptr(), mla.kv_a_layernorm.eps,
                                  None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
                                  q.data_ptr(), q_pe.data_ptr(), latent.data_ptr()):
        raise MemoryError("mla_project_x_fp32 could not allocate its scratch memory")
    return q[..., :nope], q_pe, latent


def moe_one_fp32(moe, x: torch.Tensor) -> torch.Tensor:
    """model/moe.py's MoE for one fp32 token x [1, D] in one call (routing, the chosen experts, the shared experts),
    for bf16_weights.Bf16CopyMoE: the router's fp32 weight, the experts' bf16 copies (gate_up_copy [E, 2I, D],
    down_copy [E, D, I]) and the shared experts' (moe.shared_gate_up [2Is, D], moe.shared_down [D, Is], or None)
    -> [1, D] fp32."""
    lib = _library_for(torch.float32)
    router, experts = moe.gate, moe.experts
    weight, bias = router.weight.detach(), router.e_score_correction_bias
    E, D = weight.shape
    I = experts.down_copy.shape[2]
    sgu, sd = moe.shared_gate_up, moe.shared_down
    if not (x.numel() == D and x.dtype == weight.dtype == bias.dtype == torch.float32 and weight.is_contiguous()
            and E <= 1024 and experts.gate_up_copy.shape == (E, 2 * I, D) and experts.down_copy.shape == (E, D, I)
            and (sgu is None or (sgu.dtype == sd.dtype == torch.bfloat16 and sgu.shape[1] == sd.shape[0] == D
                                 and sgu.shape[0] == 2 * sd.shape[1] and sgu.is_contiguous() and sd.is_contiguous()))):
        raise ValueError(f"moe_one_fp32 wants one fp32 token of {D} values, an fp32 router of at most 1024 experts, "
                         f"expert copies [E, 2I, D] and [E, D, I] and shared copies [2Is, D] and [D, Is] (or none); "
                         f"got x {tuple(x.shape)} {x.dtype}, router {tuple(weight.shape)} {weight.dtype}")
    x = x.contiguous()
    out = x.new_empty(1, D)
    if lib.kimi_moe_one_f32(x.data_ptr(), D, weight.data_ptr(), bias.data_ptr(), E, router.n_group,
                            router.topk_group, router.top_k, int(router.norm_topk_prob), router.scaling,
                            experts.gate_up_copy.data_ptr(), experts.down_copy.data_ptr(), I,
                            None if sgu is None else sgu.data_ptr(), None if sd is None else sd.data_ptr(),
                            0 if sd is None else sd.shape[1], out.data_ptr()):
        raise MemoryError("moe_one_fp32 could not allocate its scratch memory")
    return out


@functools.cache
def bf16_dot() -> bool:
    """True where the CPU has AVX512-BF16 pair dot products (vdpbf16ps), which mla_decode then uses for all its
    products (its fp32 multiply-add form is 1.5-1.6x slower at 2-8k tokens on this project's dev CPU)."""
    return available() and bool(_loaded().kimi_cpu_has_bf16_dot())


def _loaded() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("kimi's C kernels are not available here (they need AVX-512 and a C compiler; see "
                           "kimi/ops/cpu_kernels.py)")
    return lib


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 on the CPU, weight [N, K] bf16 contiguous -> x W^T [..., N] bf16 (fp32 sums, rounded once).
    Like every kernel here, raises RuntimeError where the kernels are not available (check available() first)."""
    lib = _loaded()
    N, K = weight.shape
    if (x.shape[-1] != K or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
            or weight.device.type != "cpu" or not weight.is_contiguous()):
        raise ValueError(f"gemv wants x [..., K] bf16 and a contiguous bf16 weight [N, K], both on the CPU; got x "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} {weight.dtype} on "
                         f"{weight.device}")
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], N)
    if lib.kimi_gemv_bf16(x.data_ptr(), x.numel() // K, K, weight.data_ptr(), N, y.data_ptr(),
                          torch.get_num_threads()):
        raise MemoryError("gemv could not allocate its fp32 copy of x")
    return y


def _pairs(w: torch.Tensor) -> torch.Tensor:
    """w [H, k, n] -> [H, ceil(k / 2), n, 2]: the values of consecutive rows k side by side (a zero row past an odd k),
    one 32-bit pair per column, as vdpbf16ps multiplies them."""
    if w.shape[1] % 2:
        w = torch.cat([w, w.new_zeros(w.shape[0], 1, w.shape[2])], 1)
    return w.view(w.shape[0], -1, 2, w.shape[2]).transpose(2, 3).contiguous()


def kv_b_pairs(mla) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj as the pairs kernel reads it: W_UK pairs along nope [H, nope / 2, r, 2] and W_UV pairs along r
    [H, r / 2, v, 2], built from MLA.absorbed_weights() and rebuilt with them (kept beside them on the module)."""
    w_uk, w_uv_t = mla.absorbed_weights()  # [H, nope, r], [H, r, v]
    cached = getattr(mla, "_kv_b_pairs", None)
    if cached is None or cached[0] is not w_uk:
        cached = (w_uk, _pairs(w_uk), _pairs(w_uv_t))
        mla._kv_b_pairs = cached
    return cached[1], cached[2]


def mla_decode(mla, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor | slice,
               lengths: torch.Tensor) -> torch.Tensor:
    """Absorbed MLA attention of B single-token queries, bf16 on the CPU: q_nope [B, 1, H, nope], q_pe [B, 1, H,
    rope]; cache [R, W] (one layer's latent rows); rows: [B, S] cache rows of each context, or a slice of
    consecutive rows (B = 1); lengths [B] int64 (sequence b attends rows[b, :lengths[b]]) -> [B, 1, H, v].
    With AVX512-BF16 (bf16_dot()) every product runs on pairs (kimi_mla_decode_pairs), else in fp32 multiply-adds."""
    lib = _loaded()
    B, _, H, nope = q_nope.shape
    weight = mla.kv_b_proj.weight
    if not (q_nope.dtype == q_pe.dtype == cache.dtype == weight.dtype == torch.bfloat16 and cache.is_contiguous()
            and weight.is_contiguous() and cache.device.type == "cpu"):
        raise ValueError("mla_decode wants bf16 CPU tensors with a contiguous cache and kv_b_proj weight")
    q_nope, q_pe = q_nope.contiguous(), q_pe.contiguous()
    lengths, rows, rows_ptr, start, S = _context(rows, lengths)
    out = q_nope.new_empty(B, 1, H, mla.v_head_dim)
    shape = (B, S, H, nope, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank, mla.scale)
    if bf16_dot():
        wk2, wv2 = kv_b_pairs(mla)
        failed = lib.kimi_mla_decode_pairs(q_nope.data_ptr(), q_pe.data_ptr(), wk2.data_ptr(), wv2.data_ptr(),
                                           cache.data_ptr(), rows_ptr, start, lengths.data_ptr(), *shape,
                                           out.data_ptr(), torch.get_num_threads())
    else:
        failed = lib.kimi_mla_decode_bf16(q_nope.data_ptr(), q_pe.data_ptr(), weight.data_ptr(), cache.data_ptr(),
                                          rows_ptr, start, lengths.data_ptr(), *shape, out.data_ptr(),
                                          torch.get_num_threads())
    if failed:
        raise MemoryError("mla_decode could not allocate its scratch memory")
    return out


def prefill_fits(mla) -> bool:
    """Whether mla_prefill takes this layer's shapes: even nope and rope (pairs), v a multiple of 16."""
    return mla.qk_nope_head_dim % 2 == mla.qk_rope_head_dim % 2 == 0 and mla.v_head_dim % 16 == 0


def mla_prefill(mla, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, start: int) -> torch.Tensor:
    """MLA.attend in the expanded form for one sequence's T queries at positions start.. over latent [1, start + T,
    W] (its whole context), causal, bf16 on a CPU with AVX512-BF16 (bf16_dot()): q_nope [1, T, H, nope], q_pe [1, T,
    H, rope] -> [1, T, H, v]. Keys and values come from kv_b_proj(latent[..., :r]) and the latent's rope columns as
    they are (no expanded [H, S, qk] copies, no zero padding of v to qk); the kernel is flash attention in bf16 pairs
    with torch's CPU flash-attention roundings (kimi_mla_prefill_bf16)."""
    lib = _loaded()
    _, T, H, nope = q_nope.shape
    S, r, rope, v = latent.shape[1], mla.kv_lora_rank, mla.qk_rope_head_dim, mla.v_head_dim
    if not (q_nope.dtype == q_pe.dtype == latent.dtype == torch.bfloat16 and q_nope.shape[0] == latent.shape[0] == 1
            and S == start + T and prefill_fits(mla) and latent.stride(-1) == 1 and latent.device.type == "cpu"):
        raise ValueError(f"mla_prefill wants one bf16 CPU sequence with S = start + T, even nope and rope, and v % 16 "
                         f"== 0; got q_nope {tuple(q_nope.shape)} {q_nope.dtype}, latent {tuple(latent.shape)}, start "
                         f"{start}, rope {rope}, v {v}")
    kv = mla.kv_b_proj(latent[..., :r]).contiguous()  # [1, S, H * (nope + v)]
    q_nope, q_pe = q_nope.contiguous(), q_pe.contiguous()
    out = q_nope.new_empty(1, T, H, v)
    k_pe = latent[0, :, r:]  # [S, rope], rows latent.stride(1) apart
    if lib.kimi_mla_prefill_bf16(q_nope.data_ptr(), q_pe.data_ptr(), kv.data_ptr(), kv.shape[-1], k_pe.data_ptr(),
                                 latent.stride(1), T, start, H, nope, rope, v, mla.scale, out.data_ptr(),
                                 torch.get_num_threads()):
        raise MemoryError("mla_prefill could not allocate its scratch memory")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model/layers.py's RMSNorm in one call: x [..., D], weight [D], both bf16 or both fp32, on the CPU ->
    [..., D] of their dtype."""
    D = x.shape[-1]
    if not (x.dtype == weight.dtype in (torch.bfloat16, torch.float32) and weight.shape == (D,)
            and x.device.type == "cpu" and weight.is_contiguous()):
        raise ValueError(f"rms_norm wants x [..., D] and a contiguous weight [D], both bf16 or both fp32, on the CPU; "
                         f"got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    lib = _library_for(x.dtype)
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.dtype == torch.bfloat16:  # rows split between threads (from 16 rows on)
        lib.kimi_rmsnorm_rows_bf16(x.data_ptr(), x.numel() // D, D, weight.data_ptr(), eps, y.data_ptr(),
                                   torch.get_num_threads())
    else:
        lib.kimi_rmsnorm_f32(x.data_ptr(), x.numel() // D, D, weight.data_ptr(), eps, y.data_ptr())
    return y


def mla_project_one(mla, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
    """The tail of model/mla.py's MLA.project for one token, bf16 or fp32 (the layer's dtype): q [H * (nope + rope)]
    (q_b_proj's or q_proj's output), kv [r + rope] (kv_a_proj_with_mqa's), cos/sin [rope / 2] fp32 (None: NoPE) ->
    q_nope [1, 1, H, nope], q_pe [1, 1, H, rope] (rotated), latent [1, 1, r + rope] (kv_a_layernorm(c_kv), then the
    rotated k_pe)."""
    H, nope, rope, r = mla.num_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    norm = mla.kv_a_layernorm
    if not (q.numel() == H * (nope + rope) and kv.numel() == r + rope
            and q.dtype == kv.dtype == norm.weight.dtype in (torch.bfloat16, torch.float32)
            and (cos is None or (cos.dtype == sin.dtype == torch.float32 and cos.numel() == sin.numel() == rope // 2))):
        raise ValueError(f"mla_project_one wants one token's q [{H * (nope + rope)}] and kv [{r + rope}] in the "
                         f"layer's dtype (bf16 or fp32) and fp32 cos/sin [{rope // 2}]; got q {tuple(q.shape)} "
                         f"{q.dtype}, kv {tuple(kv.shape)} {kv.dtype}")
    lib = _library_for(q.dtype)
    q, kv = q.contiguous(), kv.contiguous()
    if cos is not None:
        cos, sin = cos.contiguous(), sin.contiguous()
    q_pe = q.new_empty(1, 1, H, rope)
    latent = q.new_empty(1, 1, r + rope)
    project = lib.kimi_mla_project_one_f32 if q.dtype == torch.float32 else lib.kimi_mla_project_one_bf16
    project(q.data_ptr(), H, nope, rope, kv.data_ptr(), r, norm.weight.contiguous().data_ptr(), norm.eps,
            None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(), q_pe.data_ptr(),
            latent.data_ptr())
    return q.view(1, 1, H, nope + rope)[..., :nope], q_pe, latent


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weight: float = 1.0,
           total: torch.Tensor | None = None) -> torch.Tensor | None:
    """One SwiGLU MLP on one token, bf16: x [1, D] (or [D]), gate_up [2I, D] (gate rows, then up rows), down [D, I],
    all contiguous. Without `total`, returns down(silu(g) * u) [1, D] bf16; with `total` (fp32 [1, D], contiguous),
    adds bf16(y * weight) to it in place and returns None (an MoE's weighted sum over experts)."""
    lib = _loaded()
    D, I = x.shape[-1], down.shape[1]
    if not (x.numel() == D and x.dtype == gate_up.dtype == down.dtype == torch.bfloat16 and gate_up.shape == (2 * I, D)
            and down.shape == (D, I) and gate_up.is_contiguous() and down.is_contiguous()
            and (total is None or (total.dtype == torch.float32 and total.numel() == D and total.is_contiguous()))):
        raise ValueError(f"swiglu wants one bf16 row x [{D}], gate_up [2I, {D}], down [{D}, I], contiguous, and an "
                         f"fp32 total of {D} values; got x {tuple(x.shape)} {x.dtype}, gate_up {tuple(gate_up.shape)}, "
                         f"down {tuple(down.shape)}")
    x = x.contiguous()
    y = None if total is not None else x.new_empty(1, D)
    if lib.kimi_swiglu_one_bf16(x.data_ptr(), D, gate_up.data_ptr(), down.data_ptr(), I, weight,
                                None if total is None else total.data_ptr(), None if y is None else y.data_ptr(),
                                torch.get_num_threads()):
        raise MemoryError("swiglu could not allocate its scratch memory")
    return y


def moe_combine(y: torch.Tensor, w: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The end of a MoE block over many tokens (model/moe.py's Experts._combine): y [M, D] bf16 expert outputs, w [M]
    fp32 weights, token [M] int64 in [0, num_tokens) -> [num_tokens, D] bf16, each token's fp32 sum, in row order, of
    its rows' bf16(y * w), rounded once; bitwise what the torch expression gives, without its [M, D] temporaries."""
    lib = _loaded()
    M, D = y.shape
    if (y.dtype != torch.bfloat16 or w.shape != (M,) or token.shape != (M,) or y.device.type != "cpu"
            or (M and not 0 <= int(token.min()) <= int(token.max()) < num_tokens)):
        raise ValueError(f"moe_combine wants y [M, D] bf16 on the CPU, w [M], token [M] in [0, {num_tokens}); got y "
                         f"{tuple(y.shape)} {y.dtype}, w {tuple(w.shape)}, token {tuple(token.shape)}")
    y, w, token = y.contiguous(), w.float().contiguous(), token.to(torch.int64).contiguous()
    out = y.new_empty(num_tokens, D)
    if lib.kimi_moe_combine_bf16(y.data_ptr(), w.data_ptr(), token.data_ptr(), M, num_tokens, D, out.data_ptr(),
                                 torch.get_num_threads()):
        raise MemoryError("moe_combine could not allocate its scratch memory")
    return out


def _tiles(w_t: torch.Tensor, cols: int) -> torch.Tensor:
    """w_t [E, K, N] (K the summed dim) -> [E, N / cols, K / 2, cols, 2]: each tile of `cols` columns one contiguous
    run of K / 2 rows of column pairs (consecutive k side by side), as kimi_moe_experts_pairs streams them."""
    E, K, N = w_t.shape
    return w_t.reshape(E, K // 2, 2, N // cols, cols).permute(0, 3, 1, 4, 2).contiguous()


def experts_fit(hidden: int, intermediate: int) -> bool:
    """Whether moe_experts takes these sizes (hidden a multiple of 64, intermediate of 32) on this CPU."""
    return bf16_dot() and hidden % 64 == 0 and intermediate % 32 == 0


def expert_tiles(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed experts' stacked bf16 weights gate/up [E, I, D], down [E, D, I] -> moe_experts' layouts: gate_up
    [E, I / 32, D / 2, 64, 2] (each tile 32 gate columns then the same 32 up columns) and down
    [E, D / 64, I / 2, 64, 2]."""
    E, I, D = gate.shape
    if not experts_fit(D, I):
        raise ValueError(f"expert_tiles wants hidden a multiple of 64 and intermediate of 32 on an AVX512-BF16 CPU; "
                         f"got hidden {D}, intermediate {I}")
    gate_up = torch.cat([gate.transpose(1, 2).reshape(E, D, I // 32, 32),
                         up.transpose(1, 2).reshape(E, D, I // 32, 32)], -1).reshape(E, D, 2 * I)
    return _tiles(gate_up, 64), _tiles(down.transpose(1, 2), 64)


def moe_experts(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """A MoE block's routed experts and their weighted sum for a few tokens (model/moe.py's Experts.forward), in
    bf16 pair products: x [N, D] bf16, idx [N, k] expert ids, w [N, k] fp32 weights, gate_up/down from expert_tiles
    -> [N, D] bf16. The roundings are Experts' (bf16 g, u, silu, h, y; each token's fp32 sum of bf16(y * w) in
    increasing expert id, rounded once); only the order of the products' fp32 sums differs."""
    lib = _loaded()
    N, D = x.shape
    E, n_gu, D2 = gate_up.shape[:3]
    I, k = n_gu * 32, idx.shape[1]
    if not (x.dtype == gate_up.dtype == down.dtype == torch.bfloat16 and D2 * 2 == D and down.shape[:3] ==
            (E, D // 64, I // 2) and idx.shape == w.shape == (N, k) and k <= 64 and x.device.type == "cpu"):
        raise ValueError(f"moe_experts wants x [N, D] bf16, idx and w [N, k <= 64] and expert_tiles' layouts; got x "
                         f"{tuple(x.shape)} {x.dtype}, idx {tuple(idx.shape)}, w {tuple(w.shape)}, gate_up "
                         f"{tuple(gate_up.shape)}, down {tuple(down.shape)}")
    if N and not 0 <= int(idx.min()) <= int(idx.max()) < E:
        raise ValueError(f"moe_experts: expert ids must lie in [0, {E}); got {int(idx.min())}..{int(idx.max())}")
    x, idx, w = x.contiguous(), idx.to(torch.int64).contiguous(), w.float().contiguous()
    out = x.new_empty(N, D)
    if lib.kimi_moe_experts_pairs(x.data_ptr(), N, D, idx.data_ptr(), w.data_ptr(), k, gate_up.data_ptr(),
                                  down.data_ptr(), E, I, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("moe_experts could not allocate its scratch memory")
    return out


def route_one(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model/moe.py's Router.forward for one token x [1, D], bf16 or fp32 like the router's weight -> (expert ids
    [1, k] int64, weights [1, k] fp32)."""
    weight, bias = router.weight.detach(), router.e_score_correction_bias.float().contiguous()
    E, D = weight.shape
    if not (x.numel() == D and x.dtype == weight.dtype in (torch.bfloat16, torch.float32) and weight.is_contiguous()
            and E <= 1024):
        raise ValueError(f"route_one wants one row of {D} values and a contiguous router weight of at most 1024 "
                         f"experts, both bf16 or both fp32; got x {tuple(x.shape)} {x.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}")
    lib = _library_for(x.dtype)
    x = x.contiguous()
    idx = torch.empty(1, router.top_k, dtype=torch.int64)
    w = torch.empty(1, router.top_k, dtype=torch.float32)
    route = lib.kimi_route_one_f32 if x.dtype == torch.float32 else lib.kimi_route_one_bf16
    route(x.data_ptr(), D, weight.data_ptr(), bias.data_ptr(), E, router.n_group, router.topk_group, router.top_k,
          int(router.norm_topk_prob), router.scaling, idx.data_ptr(), w.data_ptr())
    return idx, w


def kda_decode(kda, qkv: torch.Tensor, f: torch.Tensor, b: torch.Tensor, gate: torch.Tensor, conv_weight: torch.Tensor,
               windows: torch.Tensor, states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """model/kda.py's KDA layer for B single tokens, from its projections to o_proj's input, on the CPU, in the
    layer's dtype (bf16, or fp32 on the fp32 kernels): qkv [B, 3P] (q, k, v projections before the conv), f [B, P]
    (f_b_proj's output), b [B, H] (b_proj's), gate [B, P] (g_b_proj's), conv_weight [3P, k] (the three conv weights
    stacked); windows [slots, 3P, k-1] (that dtype) and states [slots, H, K, K] fp32, one layer's pools, updated in
    place at rows `slots` [B] -> [B, P]."""
    B, H, K = qkv.shape[0], kda.num_heads, kda.head_dim
    P, k = H * K, kda.conv_size
    norm_w = kda.o_norm.weight.detach()
    dtype = qkv.dtype
    if not (qkv.shape == (B, 3 * P) and f.shape == gate.shape == (B, P) and b.shape == (B, H) and K <= 256
            and dtype in (torch.bfloat16, torch.float32)
            and f.dtype == b.dtype == gate.dtype == conv_weight.dtype == windows.dtype == norm_w.dtype == dtype
            and states.dtype == torch.float32 and conv_weight.shape == (3 * P, k)
            and windows.shape[1:] == (3 * P, k - 1) and states.shape[1:] == (H, K, K) and slots.shape == (B,)
            and windows.is_contiguous() and states.is_contiguous() and conv_weight.is_contiguous()
            and qkv.device.type == windows.device.type == states.device.type == "cpu"):
        raise ValueError(f"kda_decode wants qkv [B, {3 * P}], f and gate [B, {P}], b [B, {H}], a contiguous conv "
                         f"weight [{3 * P}, {k}] and contiguous pools windows [slots, {3 * P}, {k - 1}], all in one "
                         f"dtype (bf16 or fp32), states [slots, {H}, {K}, {K}] fp32, slots [B], head dim <= 256, on "
                         f"the CPU; got qkv {tuple(qkv.shape)} {qkv.dtype}, windows {tuple(windows.shape)} "
                         f"{windows.dtype}, states {tuple(states.shape)} {states.dtype}, slots {tuple(slots.shape)}")
    lib = _library_for(dtype)
    qkv, f, b, gate = (t.contiguous() for t in (qkv, f, b, gate))
    slots = slots.to(torch.int64).contiguous()
    dt_bias, a_log = kda.dt_bias.detach().float().contiguous(), kda.A_log.detach().float().contiguous()
    out = qkv.new_empty(B, P)
    step = lib.kimi_kda_decode_f32 if dtype == torch.float32 else lib.kimi_kda_decode_bf16
    if step(qkv.data_ptr(), f.data_ptr(), b.data_ptr(), gate.data_ptr(), conv_weight.data_ptr(), k, dt_bias.data_ptr(),
            a_log.data_ptr(), norm_w.contiguous().data_ptr(), kda.o_norm.eps, windows.data_ptr(), states.data_ptr(),
            slots.data_ptr(), windows.shape[0], B, H, K, K, out.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"kda_decode: slots {slots.tolist()} outside the pools' {windows.shape[0]} rows")
    return out
