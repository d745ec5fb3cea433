"""kimi's C kernels (kimi/ops/cpu_kernels.py) build and load wherever they can run: a CPU with their instructions and
a C compiler. The kernel tests skip where the kernels are unavailable, and the library falls back to torch paths
when a build fails (by design, and logged), so a source that stopped compiling would otherwise show only as slower
benchmarks."""

import os
import shutil

import pytest

from kimi.ops import cpu_kernels


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(os.environ.get("KIMI_CPU_KERNELS") == "0", reason="kernels turned off (KIMI_CPU_KERNELS=0)")
@pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None, reason="no C compiler")
@pytest.mark.skipif(not _cpu_flags(), reason="no /proc/cpuinfo to read the CPU's instructions from")
def test_kernels_build_where_the_cpu_and_compiler_allow():
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        assert cpu_kernels.available(), "cpu_kernels.c did not build or load on a CPU with AVX-512 (F, BW, VL)"
        assert cpu_kernels.bf16_dot() == ("avx512_bf16" in flags)
    if {"avx2", "fma"} <= flags:
        assert cpu_kernels.fp32_available(), "cpu_kernels_fp32.c did not build or load on a CPU with AVX2 + FMA"
