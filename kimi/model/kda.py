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
            o, new_state = self.delta_rule(q, k, v, g, beta, state, cache is not None, cu_seqlens)
        if cache is not None:
            cache.set_kda_state(self.layer_idx, new_conv, new_state)
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, self.num_heads, self.head_dim)
        return self.o_proj(self.o_norm(o, gate).reshape(B, T, -1))

    @staticmethod
    def delta_rule(q, k, v, g, beta, state, final: bool, cu_seqlens):
        """The KDA op over q, k, g [B, T, H, K], v [B, T, H, V], beta [B, T, H] -> (o [B, T, H, V], final states).

        An engine step that packs decodes (one token each) with prefill chunks runs the two kinds apart: the
        decodes as a [n, 1] batch through the recurrent form, the chunks packed through the chunked form. Packed
        together, every decode would be padded to a whole 64-token chunk, so a step mixing 16 decodes with a
        240-token chunk did about 5x the KDA work of its tokens. Only with states (an engine step, not training).
        """
        kw = dict(output_final_state=final, use_qk_l2norm_in_kernel=True)
        if cu_seqlens is None or state is None:
            return kda(q, k, v, g, beta, initial_state=state, cu_seqlens=cu_seqlens, **kw)
        lens = cu_seqlens.diff()
        single = lens == 1  # [N]
        if bool(single.all()) or not bool(single.any()):
            return kda(q, k, v, g, beta, initial_state=state, cu_seqlens=cu_seqlens, **kw)
        one = cu_seqlens[:-1][single]  # [n] packed position of each decode token
        rest = torch.ones(q.shape[1], dtype=torch.bool, device=q.device)
        rest[one] = False
        rest = rest.nonzero()[:, 0]  # packed positions of the chunks' tokens, in order
        cu_rest = F.pad(lens[~single].cumsum(0), (1, 0))
        o1, s1 = kda(*(t[0, one, None] for t in (q, k, v, g, beta)), initial_state=state[single], **kw)
        o2, s2 = kda(*(t[:, rest] for t in (q, k, v, g, beta)), initial_state=state[~single], cu_seqlens=cu_rest,
                     **kw)
        o = o2.new_empty(*q.shape[:3], v.shape[-1])
        o[0, one], o[0, rest] = o1[:, 0], o2[0]
        if not final:
            return o, None
        new_state = s2.new_empty(state.shape)
        new_state[single], new_state[~single] = s1, s2
        return o, new_state

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel log-decay g <= 0, fp32 [B, T, H, K]."""
        z = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        z = z.view(*x.shape[:2], self.num_heads, self.head_dim)
        return -torch.exp(self.A_log.float()) * F.softplus(z)

    def short_conv(self, qkv: torch.Tensor, conv_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None):
        """Causal depthwise conv + SiLU over qkv [B, T, 3P], each sequence continuing from its window of the
        previous kernel-1 inputs (conv_state [N, 3P, k-1]; zeros = a fresh sequence).

        Packed sequences run as one conv too: each sequence's window is laid in front of its tokens in one
        [3P, T + N (k-1)] row (token t of sequence i sits at column t + (i + 1)(k-1)), so no output ever reads
        across a sequence boundary, and the outputs and new windows are gathered back by index.
        Returns the activations [B, T, 3P] and the new windows [N, 3P, k-1] (None when conv_state is None).
        """
        weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], 0).to(qkv.dtype)
        pad = self.conv_size - 1
        if cu_seqlens is None:
            xt = qkv.transpose(1, 2)  # [B, 3P, T]
            window = F.pad(xt, (pad, 0)) if conv_state is None else torch.cat([conv_state.to(xt.dtype), xt], -1)
            if xt.shape[-1] == 1:  # decode: one output per channel, a k-term dot (conv1d costs ~150 us here)
                out = F.silu((window.float() * weight[:, 0].float()).sum(-1, keepdim=True).to(xt.dtype))
                out = out.transpose(1, 2)
            else:
                out = F.silu(F.conv1d(window, weight, groups=weight.shape[0])).transpose(1, 2)
            return out, (window[:, :, window.shape[-1] - pad:] if conv_state is not None else None)
        T, C = qkv.shape[1], qkv.shape[2]
        lens = cu_seqlens.diff()
        N = lens.numel()
        seq_of = torch.repeat_interleave(torch.arange(N, device=qkv.device), lens, output_size=T)  # [T]
        cols = torch.arange(T, device=qkv.device) + (seq_of + 1) * pad  # column of every token
        lead = cu_seqlens[:-1, None] + torch.arange(N, device=qkv.device)[:, None] * pad \
            + torch.arange(pad, device=qkv.device)  # [N, k-1] columns of each sequence's window
        row = qkv.new_zeros(C, T + N * pad)
        row[:, cols] = qkv[0].T
        if conv_state is not None:
            row[:, lead.flatten()] = conv_state.to(qkv.dtype).permute(1, 0, 2).reshape(C, N * pad)
        full = F.conv1d(row[None], weight, groups=C)[0]  # [3P, T + (N - 1)(k-1)]: output c ends at column c + k-1
        out = F.silu(full[:, cols - pad]).T[None]
        if conv_state is None:
            return out, None
        # the last k-1 columns of sequence i's [window, tokens] segment end just before the next segment's window
        tail = lead + lens[:, None]  # [N, k-1]
        return out, row[:, tail.flatten()].view(C, N, pad).permute(1, 0, 2)
