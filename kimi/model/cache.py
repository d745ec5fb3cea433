"""DenseCache: the per-sequence decode cache of the reference generate (the engine's paged cache is its fast twin).

Per MLA layer: the latent [B, max_len, kv_lora_rank + qk_rope_head_dim] (c_kv after its norm, k_pe after RoPE).
Per KDA layer: the short-conv window [B, 3P, kernel-1] (model dtype) and the recurrent state [B, H, K, V] (fp32).
All rows of a batch share one length: the reference generate runs equal-length prompts (or one at a time).
"""

from __future__ import annotations

import torch

from kimi.config import ModelConfig


class DenseCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device="cpu"):
        self.max_len = max_len
        self.length = 0  # tokens cached so far; the model advances it after each forward
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        P = cfg.kda_num_heads * cfg.kda_head_dim
        self.latent: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.state: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(cfg.layer_types):
            if kind == "mla":
                self.latent[i] = torch.zeros(batch_size, max_len, width, dtype=dtype, device=device)
            else:
                self.conv[i] = torch.zeros(batch_size, 3 * P, cfg.short_conv_kernel_size - 1, dtype=dtype,
                                           device=device)
                self.state[i] = torch.zeros(batch_size, cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_head_dim,
                                            dtype=torch.float32, device=device)

    def append_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Write latent [B, T, W] at positions length..length+T; return the whole cached prefix [B, length+T, W]."""
        end = self.length + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache overflow: {end} tokens exceed the cache's max_len {self.max_len}")
        buf = self.latent[layer]
        buf[:, self.length:end] = latent
        return buf[:, :end]

    def kda_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv[layer], self.state[layer]

    def set_kda_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.conv[layer].copy_(conv)
        self.state[layer].copy_(state)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.latent, self.conv, self.state) for t in d.values())
