"""Which floating-point dtype computes fast on a device: the default of inference (LLM, kimi serve / chat / generate)
and of training's autocast (kimi train --autocast auto).

bf16 halves the bytes every decode step streams and, where the hardware multiplies it natively, runs GEMMs at or
above fp32's speed: on CUDA GPUs that support it, and on CPUs for which oneDNN has bf16 kernels (AVX-512 BW/VL/DQ,
AVX512-BF16, AMX; Arm with BF16), which is what torch.ops.mkldnn._is_mkldnn_bf16_supported() reports. Elsewhere
torch falls back to a generic bf16 GEMM. Measured on a 2-core AVX2 AMD EPYC (Zen 3), one thread: a 2048x768x2048
product 8.9 GFLOP/s in bf16 vs 60.6 in fp32, a one-row product 8.3 vs 35.7 GB/s of weights, a `kimi train` step of
the built-in model 420 vs 1,300-1,540 tokens/s (bf16 autocast vs fp32; 3,700 once Muon's Newton-Schulz
ran in fp32 too, kimi/train/optim.py), and bench/engine.py's 64 concurrent
requests did not finish in 10 minutes in bf16 where fp32 took 2.4. There the default is fp32.

An explicit dtype always wins; the automatic choice is made once per device kind and logged (logger "kimi").
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("kimi")


def bf16_is_fast(device: torch.device | str) -> bool:
    """True where bf16 matmuls run natively on `device` (see the module docstring)."""
    return _bf16_is_fast(torch.device(device).type)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where it computes natively on `device`, float32 where it would be emulated."""
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def cpu_has_bf16_kernels() -> bool:
    """oneDNN has bf16 kernels for this CPU (kimi/ops/packed_linear.py prepacks bf16 weights for them)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def _bf16_is_fast(kind: str) -> bool:
    if kind == "cpu":
        fast = cpu_has_bf16_kernels()
        if not fast:
            log.info("this CPU has no native bf16 matmul (oneDNN reports no bf16 kernels): computing in float32 "
                     "by default; pass dtype / --dtype bfloat16 to override")
        return fast
    if kind == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True  # other accelerators (mps, xpu): bf16 as before; pass a dtype to choose
