"""fp32 models that read bf16 copies of their weights in decode: single rows and batches (CPUs without native bf16).

On a CPU without bf16 arithmetic (AVX2 only: most laptops, AMD Zen 2-3) kimi computes in fp32 (kimi/ops/dtypes.py),
and batch-1 decode is then a chain of fp32 matrix-vector products that stream 4 bytes per weight per token. When the
model came from a bf16 checkpoint (the usual case), every fp32 weight is exactly a bf16 number: a bf16 copy holds
the same weight in half the bytes, and kimi's AVX2 gemv (kimi/ops/cpu_kernels_fp32.c) widens it in registers and
computes the fp32 product, summed in a different order. On an AVX2 EPYC one core ran 40 products of 2048 x 768 in
10.5 ms this way vs torch's fp32 `F.linear` 25 ms (bench/decode_kernels.py).

packed_linear.pack_for_cpu(model) swaps, in place, every fp32 `nn.Linear` and stack of routed experts whose weights
are all bf16-representable (checked exactly) for a twin that sends up to FEW_ROWS rows (a decode batch, a routed
expert's tokens) to that gemv and more to torch's fp32 product on the original weight, which it keeps: prefill GEMMs
are compute-bound, where fp32 oneDNN is fastest. The rest of a single token's step runs as a few C calls per layer
too (torch's small ops cost ~5-20 us each on such CPUs): a whole MoE block (Bf16CopyMoE: routing, the chosen
experts, the shared experts), all of MLA's projections (packed_linear.OneRowMLA), its absorbed decode attention
reading kv_b_proj's copy (cpu_kernels.mla_decode_fp32), a SwiGLU MLP (packed_linear.OneRowMLP), each RMSNorm. On the
bench model that took batch-1 decode from ~15 to ~11 ms/token on an AVX2 EPYC. The copies cost half the fp32
weights' memory again.
Weights that are not bf16-representable (an fp32 checkpoint) stay as they are. The twins keep `.weight`, so the state
dict is unchanged and a tied lm_head stays tied. Like packed_linear.py's bf16 packing, this makes the model
inference-only: the copies do not follow later weight updates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi.model.moe import Experts, MoE
from kimi.ops import cpu_kernels


def bf16_exact(w: torch.Tensor) -> bool:
    """Every element of the fp32 tensor w is a bf16 number (so a bf16 copy loses nothing)."""
    return w.dtype == torch.float32 and torch.equal(w, w.bfloat16().float())


# up to this many rows the products read the bf16 copies (gemv_fp32): against torch's fp32 GEMM on weights from
# memory, 1.0-2.6x at 12-32 rows with one thread or two, 0.92-1.5x at 64, 0.82-1.6x at 128 (bench/decode_kernels.py);
# in the engine, where the weights are cold and half the bytes count, a 64-sequence decode step of the bench model
# took 17-24% less time than with the earlier cut at 8
FEW_ROWS = 64


def _one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1] and x.dtype == torch.float32


def few_rows(x: torch.Tensor) -> bool:
    """x [..., in] is fp32 with at most FEW_ROWS rows: its products stream the bf16 copies (a decode batch, the
    tokens a routed expert gets in one)."""
    return x.numel() <= FEW_ROWS * x.shape[-1] and x.dtype == torch.float32


def swiglu_few(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) for x [..., D] fp32 of a few rows on bf16 copies: gate_up [2I, D] (gate rows, then
    up rows), down [D, I] -> [..., D] fp32, as torch's SwiGLU computes it on the fp32 weights (summed in another
    order)."""
    g, u = cpu_kernels.gemv_fp32(x, gate_up).chunk(2, dim=-1)
    return cpu_kernels.gemv_fp32(F.silu(g) * u, down)


class Bf16CopyLinear(nn.Module):
    """y = x W^T for an fp32 linear whose weight is bf16-exact: up to FEW_ROWS rows read the bf16 copy (gemv_fp32),
    more rows the fp32 weight (F.linear). x [..., in] fp32 -> [..., out] fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Bf16CopyLinear takes bias-free linears only (every kimi projection is bias-free)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.plain = linear.weight.detach().bfloat16().contiguous()  # [out, in]; None once stacked elsewhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if few_rows(x) and self.plain is not None:
            return cpu_kernels.gemv_fp32(x, self.plain)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 copy"


class Bf16CopyExperts(Experts):
    """Routed experts whose products for up to FEW_ROWS tokens read bf16 copies: gate and up as one [2I, D] matrix
    (one stream), down [D, I]; a single token is one C call. More rows use the fp32 stacks, as Experts does."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.num_experts = experts.num_experts
        self.gate_proj, self.up_proj, self.down_proj = experts.gate_proj, experts.up_proj, experts.down_proj
        with torch.no_grad():
            self.gate_up_copy = torch.cat([experts.gate_proj, experts.up_proj], dim=1).bfloat16()  # [E, 2I, D]
            self.down_copy = experts.down_proj.bfloat16()  # [E, D, I]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if _one_row(x):
            return cpu_kernels.swiglu_fp32(x, self.gate_up_copy[e], self.down_copy[e])
        if few_rows(x):
            return swiglu_few(x, self.gate_up_copy[e], self.down_copy[e])
        return super().expert(e, x)

    def _accumulate(self, e: int, x: torch.Tensor, weight: torch.Tensor, total: torch.Tensor) -> None:
        """Experts._accumulate as one C call (the expert and its weighted add, all fp32)."""
        if _one_row(x):
            cpu_kernels.swiglu_fp32(x, self.gate_up_copy[e], self.down_copy[e], float(weight), total)
        else:
            super()._accumulate(e, x, weight, total)


class Bf16CopyMoE(MoE):
    """An MoE block whose routed experts (and shared experts, if any) have bf16 copies: one fp32 token runs through
    it as one C call (cpu_kernels.moe_one_fp32: routing, the chosen experts in ascending id, the shared experts),
    instead of ~15 torch ops and module calls. More rows run as MoE does."""

    def __init__(self, moe: MoE):
        nn.Module.__init__(self)
        self.gate, self.experts = moe.gate, moe.experts
        self.shared_gate_up = self.shared_down = None  # [2Is, D], [D, Is] bf16, or None without shared experts
        if hasattr(moe, "shared_experts"):
            self.shared_experts = moe.shared_experts
            self.shared_gate_up, self.shared_down = moe.shared_experts.gate_up_plain, moe.shared_experts.down_proj.plain

    @staticmethod
    def applies(moe: MoE) -> bool:
        """True for an fp32 MoE whose experts and shared experts packed_linear.pack_for_cpu gave bf16 copies."""
        shared = getattr(moe, "shared_experts", None)
        return (isinstance(moe.experts, Bf16CopyExperts) and moe.gate.weight.dtype == torch.float32
                and (shared is None or (getattr(shared, "gate_up_plain", None) is not None
                                        and shared.down_proj.plain is not None)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _one_row(x):
            return cpu_kernels.moe_one_fp32(self, x).view(x.shape)
        return super().forward(x)


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True where fp32 weights get bf16 copies: an fp32 model on a CPU where kimi's AVX2 gemv builds."""
    return device.type == "cpu" and dtype == torch.float32 and cpu_kernels.fp32_available()


def has_copies(model: nn.Module) -> bool:
    return any(isinstance(m, (Bf16CopyLinear, Bf16CopyExperts)) for m in model.modules())
