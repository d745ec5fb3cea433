"""Kimi Delta Attention layer (Kimi Linear's linear-attention token mixer).

Exactly ../shared/reference/kda.md §1: q/k/v projections, each through a depthwise causal short convolution + SiLU;
q and k L2-normalised (inside the op, fp32); a fine-grained per-channel forget gate in log space,
g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias), computed in fp32; beta = sigmoid(b_proj(x)); the delta-rule
recurrence with an fp32 state (kimi/ops/kda.py); a per-head RMSNorm gated by a low-rank sigmoid gate; o_proj.
A_log and dt_bias stay fp32 whatever the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi.config import ModelConfig
from kimi.model.layers import GatedRMSNorm
from kimi.ops.kda import kda


class KDA(nn.Module):
    FP32_PARAMS = ("A_log", "dt_bias")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = cfg.kda_num_heads, cfg.kda_head_dim
        self.conv_size = cfg.short_conv_kernel_size
        D, H, K = cfg.hidden_size, self.num_heads, self.head_dim
        P = H * K
        self.q_proj = nn.Linear(D, P, bias=False)
        self.k_proj = nn.Linear(D, P, bias=False)
        self.v_proj = nn.Linear(D, P, bias=False)
        # depthwise causal convs, weight [P, 1, kernel]; the last tap multiplies the current token
        self.q_conv1d = nn.Conv1d(P, P, self.conv_size, groups=P, bias=False)
        self.k_conv1d = nn.Conv1d(P, P, self.conv_size, groups=P, bias=False)
        self.v_conv1d = nn.Conv1d(P, P, self.conv_size, groups=P, bias=False)
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, P, bias=False)
        self.A_log = nn.Parameter(torch.zeros(1, 1, H, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(P, dtype=torch.float32))
        self.b_proj = nn.Linear(D, H, bias=False)
        self.g_a_proj = nn.Linear(D, K, bias=False)
        self.g_b_proj = nn.Linear(K, P, bias=False)
        self.o_norm = GatedRMSNorm(K, eps=cfg.rms_norm_eps)
        self.o_proj = nn.Linear(P, D, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. cache: None, or an object with `kda_state(layer)` -> (conv windows
        [N, 3P, kernel-1], fp32 states [N, H, K, V]), `set_kda_state(layer, conv, state)` and `cu_seqlens`
        (None: the N = B rows are whole sequences; else B = 1 and the N sequences are packed along T)."""
        B, T, _ = x.shape
        conv_state = state = cu_seqlens = None
        if cache is not None:
            conv_state, state = cache.kda_state(self.layer_idx)
            cu_seqlens = cache.cu_seqlens
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # [B, T, 3P]
        qkv, new_conv = self.short_conv(qkv, conv_state, cu_seqlens)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim) for t in qkv.chunk(3, dim=-1))
        g = self.gate(x)
        beta = torch.sigmoid(self.b_proj(x).float())  # [B, T, H]
        # The op picks its own compute dtype (fp32 state and decays); autocast would push its matmuls to bf16.
        with torch.autocast(x.device.type, enabled=False):
            o, new_state = kda(q, k, v, g, beta, initial_state=state, output_final_state=cache is not None,
                               use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.set_kda_state(self.layer_idx, new_conv, new_state)
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, self.num_heads, self.head_dim)
        return self.o_proj(self.o_norm(o, gate).reshape(B, T, -1))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel log-decay g <= 0, fp32 [B, T, H, K]."""
        z = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        z = z.view(*x.shape[:2], self.num_heads, self.head_dim)
        return -torch.exp(self.A_log.float()) * F.softplus(z)

    def short_conv(self, qkv: torch.Tensor, conv_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None):
        """Causal depthwise conv + SiLU over qkv [B, T, 3P], each sequence continuing from its window of the
        previous kernel-1 inputs (conv_state [N, 3P, k-1]; zeros = a fresh sequence).

        Returns the activations [B, T, 3P] and the new windows [N, 3P, k-1] (None when conv_state is None).
        """
        weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], 0).to(qkv.dtype)
        pad = self.conv_size - 1
        if cu_seqlens is None:
            seqs, states = [qkv.transpose(1, 2)], [conv_state]  # one batched [B, 3P, T] "sequence"
        else:
            bounds = cu_seqlens.tolist()
            seqs = [qkv[0, a:b].T[None] for a, b in zip(bounds, bounds[1:])]  # [1, 3P, T_i] each
            states = [None] * len(seqs) if conv_state is None else [conv_state[i:i + 1] for i in range(len(seqs))]
        outs, windows = [], []
        for xt, st in zip(seqs, states):
            window = F.pad(xt, (pad, 0)) if st is None else torch.cat([st.to(xt.dtype), xt], dim=-1)
            outs.append(F.silu(F.conv1d(window, weight, groups=weight.shape[0])))  # [b, 3P, T_i]
            windows.append(window[:, :, window.shape[-1] - pad:])
        out = outs[0].transpose(1, 2) if cu_seqlens is None else torch.cat(outs, dim=-1).transpose(1, 2)
        return out, (torch.cat(windows) if conv_state is not None else None)
