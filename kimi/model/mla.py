"""Multi-head Latent Attention (K2 layers with YaRN RoPE; Kimi Linear full-attention layers with NoPE).

Math: ../shared/reference/k2.md §2 (and kda.md §3 for the NoPE variant). One layer, two forms:
- expanded (training, prefill): the latent is up-projected through kv_b_proj into per-head keys/values and
  ordinary causal attention runs over qk_head_dim keys and v_head_dim values;
- absorbed (decode over a latent cache): W_UK is folded into the query and W_UV applied after attention, so
  attention is MQA over the kv_lora_rank + qk_rope_head_dim latent (576 values per token at full size).
Both forms compute the same function; tests hold them to each other and to transformers' DeepseekV3Attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi.config import ModelConfig
from kimi.model.layers import RMSNorm, Rotary, apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.qk_head_dim = cfg.qk_head_dim
        self.scale = cfg.softmax_scale
        H, D = self.num_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # the reference fixes 1e-6 here
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=False)
        self.rotary = Rotary(self.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.use_rope else None
        # None: choose per call (absorbed when few queries attend many cached tokens); True/False forces a form.
        self.absorb: bool | None = None
        # QK-Clip statistics (train/qk_clip.py): running per-head max of scale * q.k over training forwards.
        self.record_max_logits = False
        self.max_logits: torch.Tensor | None = None
        self._absorbed: tuple | None = None  # absorbed_weights()' cache: (key, W_UK, W_UV^T)

    # ---- pieces shared by both forms -----------------------------------------------------------------------
    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """x [B, T, D] -> q_nope [B, T, H, nope], q_pe [B, T, H, rope], latent [B, T, kv_lora + rope].

        The latent is what a cache stores: the normalised c_kv and the shared rope key, already rotated.
        """
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_a_proj(x)
        return self.finish_project(q, self.kv_a_proj_with_mqa(x), positions)

    def finish_project(self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor):
        """project after its two products of x (ops/packed_linear.py's OneRowMLA computes them its own way):
        q [B, T, q_proj's or q_a_proj's outputs], kv [B, T, kv_lora + rope] (kv_a_proj_with_mqa's) -> project's."""
        B, T, _ = kv.shape
        if not hasattr(self, "q_proj"):
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(B, T, self.num_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        if self.rotary is not None:
            cos, sin = self.rotary(positions)  # [B or 1, T, rope/2]
            q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None])
            k_pe = apply_rope(k_pe, cos, sin)
        return q_nope, q_pe, torch.cat([c_kv, k_pe], dim=-1)

    def use_absorbed(self, q_len: int, kv_len: int) -> bool:
        if self.absorb is not None:
            return self.absorb
        # Expanding costs kv_lora*(nope+v) MACs per head per context token, paid once per call; absorbing costs
        # (2*kv_lora + rope - qk - v) extra MACs per head per (query, context) pair. Absorb when that is cheaper.
        expand = kv_len * self.kv_lora_rank * (self.qk_nope_head_dim + self.v_head_dim)
        absorb = q_len * kv_len * (2 * self.kv_lora_rank + self.qk_rope_head_dim - self.qk_head_dim - self.v_head_dim)
        return kv_len > q_len and absorb < expand

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """x [B, T, D]; positions [B or 1, T] -> [B, T, D].

        cache: None (plain causal attention over x) or an object with `mla_attention(layer, q_nope, q_pe, latent)`
        that stores the new latent and attends over everything cached: model/cache.py's DenseCache for the
        reference generate, the engine's paged context for serving.
        """
        B, T, _ = x.shape
        q_nope, q_pe, latent = self.project(x, positions)
        if cache is None:
            o = self.attend_expanded(q_nope, q_pe, latent, None)
        else:
            o = cache.mla_attention(self, q_nope, q_pe, latent)
        return self.o_proj(o.reshape(B, T, -1))

    def attend(self, q_nope, q_pe, latent, start: int) -> torch.Tensor:
        """Attend T new queries (at positions start..start+T-1) over latent [B, start+T, W], in whichever form is
        cheaper (use_absorbed) -> [B, T, H, v]."""
        T, S = q_nope.shape[1], latent.shape[1]
        mask = causal_mask(T, S, start, q_nope.device)
        if self.use_absorbed(T, S):
            return self.attend_absorbed(q_nope, q_pe, latent, mask)
        return self.attend_expanded(q_nope, q_pe, latent, mask)

    # ---- the two forms -------------------------------------------------------------------------------------
    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [B, S, kv_lora + rope] -> keys [B, H, S, qk], values [B, H, S, v]."""
        B, S, _ = latent.shape
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe[:, :, None, :].expand(B, S, self.num_heads, self.qk_rope_head_dim)
        k = torch.cat([k_nope, k_pe], dim=-1)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend_expanded(self, q_nope, q_pe, latent, mask) -> torch.Tensor:
        """-> [B, T, H, v]. mask: bool [T, S] (True = may attend) or None for plain causal with T == S."""
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, qk]
        k, v = self.expand(latent)
        return self._sdpa(q, k, self._pad_v(v), mask)[..., : self.v_head_dim].transpose(1, 2)

    def attend_packed(self, q_nope, q_pe, latent, cu_seqlens: list[int]) -> torch.Tensor:
        """Causal attention within each of N sequences packed along T (training rows holding several documents):
        q_nope [1, T, H, nope], q_pe [1, T, H, rope], latent [1, T, W], cu_seqlens N + 1 offsets -> [1, T, H, v].

        Each sequence runs on its own through SDPA's causal path, ~sum(len^2) / 2 score pairs, instead of all T^2
        under one block-diagonal [T, T] mask (at T 1,024 with ~300-token documents, ~7x fewer).
        """
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [1, H, T, qk]
        k, v = self.expand(latent)
        v = self._pad_v(v)
        # split, not a slice per sequence: each slice's backward would zero-fill a gradient of all T tokens
        lens = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
        outs = [self._sdpa(*qkv, None) for qkv in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))]
        return torch.cat(outs, dim=2)[..., : self.v_head_dim].transpose(1, 2)

    def _pad_v(self, v: torch.Tensor) -> torch.Tensor:
        # torch's fused CPU/GPU attention kernels want one head dim for q, k and v: pad v with zeros
        pad = self.qk_head_dim - self.v_head_dim
        return F.pad(v, (0, pad)) if pad > 0 else v

    def _sdpa(self, q, k, v, mask) -> torch.Tensor:
        """q [B, H, T, qk], k/v [B, H, S, qk] -> [B, H, T, qk]; records QK-Clip's maxima in training."""
        if self.record_max_logits and self.training:
            self._record(q, k, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)

    def attend_absorbed(self, q_nope, q_pe, latent, mask) -> torch.Tensor:
        """MQA over the latent: score = scale * (W_UK^T q_nope . c_kv + q_pe . k_pe); out = W_UV (p . c_kv)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # [H, nope, r], [H, v, r]
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # [B, H, T, r]
        q = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1)  # [B, H, T, r + rope]
        kv = latent[:, None]  # [B, 1, S, r + rope]: one key head shared by all query heads
        scores = torch.matmul(q, kv.transpose(-1, -2)).float() * self.scale  # [B, H, T, S]
        if mask is None:
            mask = causal_mask(q.shape[2], kv.shape[2], 0, q.device, always=True)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1).to(latent.dtype)
        o_lat = torch.matmul(p, kv[..., : self.kv_lora_rank])  # [B, H, T, r]
        return torch.einsum("bhtr,hvr->bthv", o_lat, w_uv)

    @torch.no_grad()
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split for batched products over heads: W_UK [H, nope, r] and W_UV^T [H, r, v], both contiguous.

        Cached, because the strided views of the weight are copied by every bmm that reads them (~75 us of a ~300 us
        batch-1 decode attention at bench size), and rebuilt whenever the weight changes: another storage, or an
        in-place update (its version counter; an inference-mode weight has none and is never updated, so it is
        keyed by storage alone)."""
        w = self.kv_b_proj.weight
        try:
            key = (w.data_ptr(), w._version)
        except RuntimeError:
            key = (w.data_ptr(), None)
        if self._absorbed is None or self._absorbed[0] != key:
            w = w.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
            w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
            self._absorbed = (key, w_uk.contiguous(), w_uv.transpose(1, 2).contiguous())
        return self._absorbed[1], self._absorbed[2]

    @torch.no_grad()
    def _record(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Running per-head max of the pre-softmax logit over the batch (QK-Clip's signal, muon.md §2.2).

        q [B, H, T, qk], k [B, H, S, qk]; mask bool [T, S] (True = may attend) or None = causal. One batch row at
        a time, masked in place in the matmul's own dtype and scaled after the max (the scale is positive and
        rounding is monotonic, so this equals max(scale * scores) exactly). The whole-batch fp32 scores and their
        masked copy were fresh 64 MB buffers at B 4, T 1,024: ~330 ms of a ~1.5 s training step on CPU.
        """
        hidden = ~causal_mask(q.shape[2], k.shape[2], 0, q.device, always=True) if mask is None else ~mask
        m = None
        for b in range(q.shape[0]):
            scores = torch.matmul(q[b], k[b].transpose(-1, -2)).masked_fill_(hidden, float("-inf"))  # [H, T, S]
            row = scores.amax(dim=(1, 2))
            m = row if m is None else torch.maximum(m, row)
        m = m.float() * self.scale  # [H]
        self.max_logits = m if self.max_logits is None else torch.maximum(self.max_logits, m)


def causal_mask(q_len: int, kv_len: int, start: int, device, always: bool = False) -> torch.Tensor | None:
    """bool [q_len, kv_len]: query i (at position start + i) sees keys 0..start + i. None for the plain square
    causal case unless `always`, so SDPA can take its is_causal fast path."""
    if start == 0 and q_len == kv_len and not always:
        return None
    i = torch.arange(q_len, device=device)[:, None] + start
    return torch.arange(kv_len, device=device)[None, :] <= i
