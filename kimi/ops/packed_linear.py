"""oneDNN-prepacked bf16 weights for CPU inference.

Batch-1 decode on a CPU is a chain of matrix-vector products that stream every weight from memory once per token.
torch's plain bf16 `F.linear` re-lays the weight out on every call and reaches ~8 GB/s on this project's dev CPU
(AMD EPYC, AVX512-BF16); the same product on a weight reordered once into oneDNN's blocked layout reaches ~15 GB/s,
and the results are bit-for-bit the same (same kernel family, same fp32 accumulation; tests/test_packed_linear.py).
Prefill matmuls gain 5-15% too. For a single row (batch-1 decode) kimi's own kernel (kimi/ops/cpu_kernels.py)
streams the plain weight at ~17-24 GB/s where oneDNN's packed one reaches 11-16: where it is available, each packed
module also keeps its plain bf16 weight (twice the weight memory, the price of the fastest path for both shapes)
and single rows go through it. Its sums run in a different order, so those rows match the plain twin to bf16
rounding, not bit for bit (tests/test_cpu_kernels.py).

`pack_for_cpu(model)` swaps, in place, every bf16 CPU `nn.Linear` for a `PackedLinear`, every stack of routed
experts for `PackedExperts` (with AVX512-BF16: tile-major pair layouts for one C call per MoE block instead) and,
where the C kernels run, every RMSNorm, router, SwiGLU MLP, MLA and KDA layer for
a one-row variant that runs a single token's norm, routing, MLP, projections or KDA step in a few C calls
(kimi/ops/cpu_kernels.py). The model becomes inference-only: a packed weight is an opaque oneDNN tensor, it has no
gradient, and it is not in the state dict (kimi.model.loader.save_model refuses a packed model). Left as they are:
MLA's kv_b_proj (its weight is read directly by the absorbed decode form), a tied lm_head (its weight is the
embedding table), the router's weight (it runs in fp32), and quantised experts. An fp32 model gets bf16 copies of its
bf16-exact weights instead (kimi/ops/bf16_weights.py: CPUs without native bf16), and the same one-row variants of
its norms, routers, MLPs, MLA and KDA layers (plus bf16_weights.Bf16CopyMoE), on the fp32 kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi.model.kda import KDA
from kimi.model.layers import MLP, RMSNorm
from kimi.model.mla import MLA
from kimi.model.moe import Experts, MoE, Router
from kimi.ops import bf16_weights, cpu_kernels, dtypes

UNPACKED = ("kv_b_proj",)  # children whose .weight other code reads


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True where packing applies: bf16 on a CPU whose oneDNN build has bf16 kernels, or fp32 on a CPU where kimi's
    AVX2 gemv builds (kimi/ops/bf16_weights.py)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and dtypes.cpu_has_bf16_kernels()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")) or bf16_weights.supported(device, dtype)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] bf16 -> the same matrix in oneDNN's layout for small-batch products (opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def _linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _one_row(x: torch.Tensor, plain: torch.Tensor | None) -> bool:
    """True where x [..., in] is a single row and its product should run through gemv on the plain weight."""
    return plain is not None and x.numel() == x.shape[-1] and cpu_kernels.runs(x.dtype)


def _gemv(x: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """x [..., in] times a plain bf16 weight [out, in]: bf16 x -> bf16 (cpu_kernels.gemv), fp32 x -> fp32
    (gemv_fp32, the weight a bf16 copy: kimi/ops/bf16_weights.py)."""
    return cpu_kernels.gemv_fp32(x, plain) if x.dtype == torch.float32 else cpu_kernels.gemv(x, plain)


def _plain(weight: torch.Tensor) -> torch.Tensor | None:
    """The plain weight gemv reads, kept only where gemv runs."""
    return weight.detach().contiguous() if cpu_kernels.available() else None


def _stack_plain(linears: list[nn.Module]) -> torch.Tensor | None:
    """The plain weights of linears that read the same x, stacked into one [sum of outs, in] matrix (one weight
    stream, one gemv call for a single row); the linears drop theirs, as single rows no longer reach them. None
    where any of them has no plain weight (not packed and no bf16 copy, or the kernels do not run)."""
    if not all(isinstance(m, (PackedLinear, bf16_weights.Bf16CopyLinear)) and m.plain is not None for m in linears):
        return None
    stacked = torch.cat([m.plain for m in linears])
    for m in linears:
        m.plain = None
    return stacked


class PackedLinear(nn.Module):
    """y = x W^T with W prepacked; x [..., in] bf16 -> [..., out] bf16."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free linears only (every kimi projection is bias-free)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight)
        self.plain = _plain(linear.weight)  # [out, in] for single rows (gemv), or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.gemv(x, self.plain) if _one_row(x, self.plain) else _linear(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


class PackedExperts(Experts):
    """Routed experts for CPU inference. Where the CPU has AVX512-BF16 (and hidden and intermediate sizes are
    multiples of 64 and 32): the whole block, every expert and the weighted sum, is one C call on tile-major pair
    layouts of the weights (cpu_kernels.moe_experts), at any number of tokens: 1.2-1.8x oneDNN's per-expert products
    from 4 to 1,024 tokens at bench size with the weights coming from memory (bench/decode_kernels.py), and no Python
    loop over experts. Elsewhere: one prepacked oneDNN matrix per expert and projection, with plain copies for single
    rows (gemv). The stacked parameters are dropped either way. tiles=False takes the oneDNN path where the kernel
    would run (to compare)."""

    def __init__(self, experts: Experts, tiles: bool = True):
        nn.Module.__init__(self)
        self.num_experts = experts.num_experts
        _, intermediate, hidden = experts.gate_proj.shape
        self.tiles = None  # (gate_up, down) in moe_experts' layouts
        if tiles and cpu_kernels.available() and cpu_kernels.experts_fit(hidden, intermediate):
            self.tiles = cpu_kernels.expert_tiles(experts.gate_proj.detach(), experts.up_proj.detach(),
                                                  experts.down_proj.detach())
            return
        self.gate = [_pack(w) for w in experts.gate_proj]
        self.up = [_pack(w) for w in experts.up_proj]
        self.down = [_pack(w) for w in experts.down_proj]
        # single rows: gate and up as one [2 * I, D] matrix (one stream, one call), down [D, I]
        self.gate_up_plain = [_plain(torch.cat([g, u])) if cpu_kernels.available() else None
                              for g, u in zip(experts.gate_proj, experts.up_proj)]
        self.down_plain = [_plain(w) for w in experts.down_proj]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.tiles is not None:
            return cpu_kernels.moe_experts(x, idx, w, *self.tiles)
        return super().forward(x, idx, w)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if _one_row(x, self.down_plain[e]):
            g, u = cpu_kernels.gemv(x, self.gate_up_plain[e]).chunk(2, dim=-1)
            return cpu_kernels.gemv(F.silu(g) * u, self.down_plain[e])
        return _linear(F.silu(_linear(x, self.gate[e])) * _linear(x, self.up[e]), self.down[e])

    def _combine(self, y: torch.Tensor, w: torch.Tensor, token: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Experts._combine as one C call where the kernels run (same roundings and order, no fp32 [M, D] product)."""
        if cpu_kernels.available() and y.dtype == torch.bfloat16:
            return cpu_kernels.moe_combine(y, w, token, x.shape[0])
        return super()._combine(y, w, token, x)

    def _accumulate(self, e: int, x: torch.Tensor, weight: torch.Tensor, total: torch.Tensor) -> None:
        """Experts._accumulate as one C call (the expert and its weighted add, same roundings)."""
        if _one_row(x, self.down_plain[e]):
            cpu_kernels.swiglu(x, self.gate_up_plain[e], self.down_plain[e], float(weight), total)
        else:
            super()._accumulate(e, x, weight, total)


class OneRowMLP(MLP):
    """A SwiGLU MLP (shared experts, dense layers) with plain bf16 weights (packed, or an fp32 model's bf16 copies)
    whose single rows run as one C call, gate and up stacked into one weight stream."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.gate_up_plain = _stack_plain([mlp.gate_proj, mlp.up_proj])  # [2I, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _one_row(x, self.down_proj.plain):
            swiglu = cpu_kernels.swiglu_fp32 if x.dtype == torch.float32 else cpu_kernels.swiglu
            return swiglu(x, self.gate_up_plain, self.down_proj.plain).view(x.shape)
        if bf16_weights.few_rows(x) and self.down_proj.plain is not None and cpu_kernels.runs(x.dtype):
            return bf16_weights.swiglu_few(x, self.gate_up_plain, self.down_proj.plain)
        return super().forward(x)


class OneRowRouter(Router):
    """The router, with a single token routed in one C call (sigmoid scores, grouped top-k, weights); bf16 or fp32."""

    def __init__(self, router: Router):
        nn.Module.__init__(self)
        for name in ("top_k", "n_group", "topk_group", "norm_topk_prob", "scaling"):
            setattr(self, name, getattr(router, name))
        self.weight = router.weight
        self.register_buffer("e_score_correction_bias", router.e_score_correction_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (x.shape[0] == 1 and x.dtype == self.weight.dtype and x.device.type == "cpu"
                and self.weight.shape[0] <= 1024 and cpu_kernels.runs(x.dtype)):
            return cpu_kernels.route_one(self, x)
        return super().forward(x)


class OneRowRMSNorm(RMSNorm):
    """RMSNorm whose single rows (bf16 or fp32) run as one C call (~5 us instead of ~24 us of torch ops at D 768),
    and bf16 rows of any number too, split between threads (~0.35 ms instead of ~4 ms at 2,048 x 768); the same
    arithmetic, fp32 summation order aside (kimi/ops/cpu_kernels.py)."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == self.weight.dtype and (x.numel() == x.shape[-1] or x.dtype == torch.bfloat16)
                and x.device.type == "cpu" and cpu_kernels.runs(x.dtype)):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class OneRowMLA(MLA):
    """An MLA layer with plain bf16 weights (packed, or an fp32 model's bf16 copies) whose one-token projections are
    two gemv calls (the products of x stacked into one weight stream, then q_b_proj) and one C call for the norm, the
    rotations and the latent (cpu_kernels.mla_project_one; in torch that tail is ~15 small ops a layer); in fp32 all
    of it is one call (cpu_kernels.mla_project_x_fp32), and a few rows take the stacked product too. A bf16 prefill
    chunk attends through one C call (`attend`). Everything else is MLA's."""

    def __init__(self, mla: MLA):
        nn.Module.__init__(self)
        self.__dict__.update(mla.__dict__)  # the same parameters, submodules and settings
        self.q_lora = hasattr(mla, "q_a_proj")  # K2: q through a low-rank pair; Kimi Linear: a plain q_proj
        inputs = [mla.q_a_proj if self.q_lora else mla.q_proj, mla.kv_a_proj_with_mqa]
        self.in_plain = _stack_plain(inputs)  # [q_lora (or H * qk) + r + rope, D], or None
        self.in_split = [m.out_features for m in inputs]
        # fp32 with bf16 copies of every projection: the whole of project is one call (cpu_kernels.mla_project_x_fp32)
        self.one_call = (self.in_plain is not None and mla.kv_a_layernorm.weight.dtype == torch.float32
                         and (not self.q_lora or getattr(mla.q_b_proj, "plain", None) is not None))

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        if not (x.dtype == self.kv_a_layernorm.weight.dtype and cpu_kernels.runs(x.dtype)):
            return super().project(x, positions)
        if x.numel() != x.shape[-1]:  # fp32, a few rows (a decode batch): the stacked products from the bf16 copies
            if self.in_plain is not None and bf16_weights.few_rows(x):
                return self.finish_project(*_gemv(x, self.in_plain).split(self.in_split, dim=-1), positions)
            return super().project(x, positions)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(positions)
        if self.one_call:
            return cpu_kernels.mla_project_x_fp32(self, x, self.in_plain, cos, sin)
        if self.in_plain is not None:
            q, kv = _gemv(x.view(1, -1), self.in_plain).split(self.in_split, dim=-1)
        else:  # an fp32 model whose weights are not bf16-exact: torch's products, the tail still one call
            q, kv = (self.q_a_proj if self.q_lora else self.q_proj)(x), self.kv_a_proj_with_mqa(x)
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        return cpu_kernels.mla_project_one(self, q, kv, cos, sin)

    def attend(self, q_nope, q_pe, latent, start: int) -> torch.Tensor:
        """MLA.attend; a bf16 prefill chunk in the expanded form runs as one C call where the CPU has AVX512-BF16
        (cpu_kernels.mla_prefill: flash attention in bf16 pairs, 2.3-2.5x torch's SDPA at bench size)."""
        T, S = q_nope.shape[1], latent.shape[1]
        if (q_nope.dtype == torch.bfloat16 and q_nope.shape[0] == 1 and S == start + T and T > 1
                and not self.use_absorbed(T, S) and cpu_kernels.prefill_fits(self) and cpu_kernels.bf16_dot()):
            return cpu_kernels.mla_prefill(self, q_nope, q_pe, latent, start)
        return super().attend(q_nope, q_pe, latent, start)


class OneRowKDA(KDA):
    """A KDA layer (bf16 packed, or fp32) whose single-token steps (engine decode, reference generate) run between
    the projections and o_proj as one C call that updates the cache's conv windows and states in place
    (cpu_kernels.kda_decode): the torch path is ~40 small ops, plus a gather and a scatter of every sequence's fp32
    state through the engine's pool. For one token the six projections that read x are one stacked gemv (where they
    have plain bf16 weights). Anything else is KDA.forward."""

    def __init__(self, kda: KDA):
        nn.Module.__init__(self)
        self.__dict__.update(kda.__dict__)  # the same parameters, submodules and settings
        self.conv_weight = torch.cat([kda.q_conv1d.weight, kda.k_conv1d.weight, kda.v_conv1d.weight])[:, 0].detach() \
            .contiguous()  # [3P, k]
        inputs = [kda.q_proj, kda.k_proj, kda.v_proj, kda.f_a_proj, kda.g_a_proj, kda.b_proj]
        self.in_plain = _stack_plain(inputs)  # [3P + K + K + H, D], or None
        self.in_split = [sum(m.out_features for m in inputs[:3]), *(m.out_features for m in inputs[3:])]

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        B, T, D = x.shape
        if not (T == 1 and cache is not None and cache.cu_seqlens is None and hasattr(cache, "kda_slots")
                and x.dtype == self.o_norm.weight.dtype and x.device.type == "cpu" and cpu_kernels.runs(x.dtype)):
            return super().forward(x, positions, cache)
        rows = x.view(B, D)
        if self.in_plain is not None and (B == 1 or bf16_weights.few_rows(rows)):  # fp32: a few rows too
            qkv, f, g, b = _gemv(rows, self.in_plain).split(self.in_split, dim=-1)
        else:
            qkv = torch.cat([self.q_proj(rows), self.k_proj(rows), self.v_proj(rows)], dim=-1)
            f, g, b = self.f_a_proj(rows), self.g_a_proj(rows), self.b_proj(rows)
        windows, states, slots = cache.kda_slots(self.layer_idx)
        o = cpu_kernels.kda_decode(self, qkv, self.f_b_proj(f), b, self.g_b_proj(g), self.conv_weight, windows,
                                   states, slots)
        return self.o_proj(o).view(B, 1, D)


def pack_for_cpu(model: nn.Module) -> int:
    """Pack `model`'s linears and experts in place (see the module docstring); returns how many modules changed.
    An fp32 model's bf16-exact linears, experts and MLPs get bf16 copies instead (kimi/ops/bf16_weights.py; its
    other weights and modules stay as they are). Raises ValueError where neither applies (not CPU, no oneDNN bf16
    for a bf16 model, no AVX2 gemv for an fp32 one)."""
    first = next(model.parameters())
    if not supported(first.device, first.dtype):
        raise ValueError(f"packing needs a bfloat16 model on a CPU with oneDNN bf16 kernels, or a float32 model on a "
                         f"CPU with AVX2 + FMA and a C compiler; this one is {first.dtype} on {first.device}")
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    copies = bf16_weights.supported(first.device, first.dtype)
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            may_drop_weight = not (name in UNPACKED or (tied and name == "lm_head"))  # PackedLinear has no .weight
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and may_drop_weight:
                setattr(parent, name, PackedLinear(child))
            elif type(child) is nn.Linear and copies and bf16_weights.bf16_exact(child.weight):  # keeps .weight
                setattr(parent, name, bf16_weights.Bf16CopyLinear(child))
            elif type(child) is Experts and child.gate_proj.dtype == torch.bfloat16:
                setattr(parent, name, PackedExperts(child))
            elif type(child) is Experts and copies and all(map(bf16_weights.bf16_exact, (
                    child.gate_proj, child.up_proj, child.down_proj))):
                setattr(parent, name, bf16_weights.Bf16CopyExperts(child))
            elif type(child) is RMSNorm and cpu_kernels.runs(child.weight.dtype):
                setattr(parent, name, OneRowRMSNorm(child))
            elif type(child) is Router and cpu_kernels.runs(child.weight.dtype):
                setattr(parent, name, OneRowRouter(child))
            else:
                continue
            changed += 1
    for parent in reversed(list(model.modules())):  # then blocks, children before parents (an MoE after its MLP)
        for name, child in list(parent.named_children()):
            linears = (child.gate_proj, child.up_proj, child.down_proj) if type(child) is MLP else ()
            if linears and all(isinstance(m, (PackedLinear, bf16_weights.Bf16CopyLinear)) and m.plain is not None
                               for m in linears):
                setattr(parent, name, OneRowMLP(child))
                changed += 1
            elif type(child) is MoE and bf16_weights.Bf16CopyMoE.applies(child):
                setattr(parent, name, bf16_weights.Bf16CopyMoE(child))
                changed += 1
            elif type(child) is KDA and cpu_kernels.runs(child.o_norm.weight.dtype):
                setattr(parent, name, OneRowKDA(child))
                changed += 1
            elif type(child) is MLA and cpu_kernels.runs(child.kv_a_layernorm.weight.dtype):
                setattr(parent, name, OneRowMLA(child))
                changed += 1
    return changed


def is_packed(model: nn.Module) -> bool:
    """True where the model holds oneDNN-packed weights (which are not in its state dict). An fp32 model's bf16
    copies (bf16_weights.has_copies) keep the weights as they were."""
    return any(isinstance(m, (PackedLinear, PackedExperts)) for m in model.modules())
