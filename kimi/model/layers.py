"""Small building blocks shared by both model families: RMSNorm, gated RMSNorm, SwiGLU MLP, RoPE with YaRN.

RoPE/YaRN follows ../shared/reference/k2.md §3 exactly: interleaved pairs, the beta_fast/beta_slow ramp over pair
index, attention factor on cos/sin, and (in MLA) mscale^2 on the softmax scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kimi.config import YaRN, yarn_mscale


class RMSNorm(nn.Module):
    """y = w * x / rms(x), normalised in fp32 and cast back before the weight (as the reference does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """KDA output norm: RMSNorm over the head dim, times w, times sigmoid(gate); all in fp32 (kda.md §1.5)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight.float() * h * torch.sigmoid(gate.float())
        return h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Checkpoint names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_frequencies(dim: int, theta: float, yarn: YaRN | None) -> tuple[torch.Tensor, float]:
    """Per-pair angular frequencies [dim/2] (fp32) and the factor cos/sin are multiplied by.

    YaRN (k2.md §3): pairs that complete >= beta_fast rotations within the original context keep their frequency,
    pairs with < beta_slow rotations are divided by `factor`, with a linear ramp between.
    """
    wavelength = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    base = 1.0 / wavelength
    if yarn is None:
        return base, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freqs = 1.0 / (yarn.factor * wavelength) * ramp + base * (1 - ramp)
    if yarn.mscale and yarn.mscale_all_dim:
        attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(yarn.factor)
    return freqs, attention_factor


class Rotary(nn.Module):
    """cos/sin tables [positions, dim/2] computed once (grown by doubling when a longer position is asked for)."""

    def __init__(self, dim: int, theta: float, yarn: YaRN | None):
        super().__init__()
        self.dim, self.theta, self.yarn = dim, theta, yarn
        self._cos = self._sin = None  # plain attributes, not buffers: never saved, never on the meta device

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int [...] -> cos, sin: fp32 [..., dim/2]."""
        cos, sin = self.table(int(positions.max()) + 1 if positions.numel() else 1, positions.device)
        return cos[positions], sin[positions]

    def table(self, need: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cos, sin tables, fp32 [>= need positions, dim/2] on `device` (row p: position p)."""
        if self._cos is None or self._cos.shape[0] < need or self._cos.device != torch.device(device):
            n = max(need, 2 * self._cos.shape[0] if self._cos is not None else 4096)
            freqs, factor = rope_frequencies(self.dim, self.theta, self.yarn)
            angles = torch.arange(n, dtype=torch.float32)[:, None] * freqs[None, :]
            self._cos = (angles.cos() * factor).to(device)
            self._sin = (angles.sin() * factor).to(device)
        return self._cos, self._sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) by angle j. x: [..., dim]; cos/sin broadcastable to [..., dim/2].

    The result is written de-interleaved ([all rotated evens | all rotated odds]). q and k get the same permutation,
    so every q.k product is unchanged; it saves a strided copy, and the latent cache stores k_pe in this order.
    """
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
