"""Fine-grained MoE: sigmoid router with a selection-only bias and grouped top-k, stacked routed experts, shared
experts (../shared/reference/k2.md §4, kda.md §4).

Routed experts are stored stacked, one [E, out, in] parameter per projection; the checkpoint's per-expert tensors
(`experts.{e}.gate_proj.weight`, or Kimi Linear's `experts.{e}.w1.weight`) map onto slices of them in the loader.
Tokens are grouped by expert (sorted once) and each active expert runs one matmul over its tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi.config import ModelConfig
from kimi.model.layers import MLP


class Router(nn.Module):
    """Checkpoint name `gate`: weight [E, D]; e_score_correction_bias [E] fp32 (a buffer: static at inference)."""

    FP32_PARAMS = ("e_score_correction_bias",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, k] int64, combine weights [N, k] fp32)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E]
        choice = scores + self.e_score_correction_bias.float()  # the bias steers selection only
        if self.n_group > 1:
            N, E = choice.shape
            groups = choice.view(N, self.n_group, E // self.n_group)
            group_score = groups.topk(2, dim=-1).values.sum(-1)  # [N, G]: each group scored by its top-2
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = groups.masked_fill(~keep[..., None], float("-inf")).view(N, E)
        idx = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, idx)  # combine with the unbiased sigmoid scores
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.scaling


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate_proj/up_proj [E, I, D], down_proj [E, D, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens x [n, D] -> [n, D]. Quantised experts override this."""
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx/w [N, k] -> sum_k w * expert_idx(x), [N, D]."""
        return self._one_token(x, idx, w) if x.shape[0] == 1 else self._grouped(x, idx, w)

    def _grouped(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # group the N*k (token, slot) pairs by expert
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        # split, not a slice per expert: a slice's backward zero-fills a gradient the size of all N*k rows, once
        # per expert (~2 ms each at 8,192 x 128 in training); split's backward is one concatenation
        parts = x[token].split(counts)
        ys = [self.expert(e, part) for e, part in enumerate(parts) if counts[e]]
        return self._combine(torch.cat(ys), w.flatten()[order], token, x)

    def _combine(self, y: torch.Tensor, w: torch.Tensor, token: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [M, D] expert outputs, w [M] their fp32 weights, token [M] their tokens -> [N, D] in x's dtype: each
        token's sum of its rows' bf16(y * w) (weights stay fp32 until here; index_add_ sums in fp32, rounds once)."""
        return torch.zeros_like(x).index_add_(0, token, (y * w[:, None]).to(x.dtype))

    def _one_token(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """forward for x [1, D] (batch-1 decode) without the sort, gather and scatter, in the same arithmetic as
        _grouped: each expert output weighted in fp32 and rounded to x's dtype, then summed in fp32 by ascending
        expert id (what index_add_ does for bf16 on a CPU) and rounded once."""
        ids = idx[0].tolist()
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for j in sorted(range(len(ids)), key=ids.__getitem__):
            self._accumulate(ids[j], x, w[:, j:j + 1], total)
        return total.to(x.dtype)

    def _accumulate(self, e: int, x: torch.Tensor, weight: torch.Tensor, total: torch.Tensor) -> None:
        """One term of _one_token's sum: total [1, D] fp32 += round(expert_e(x) * weight [1, 1] fp32)."""
        total += (self.expert(e, x) * weight).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, w = self.gate(flat)
        y = self.experts(flat, idx, w).view(shape)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y
