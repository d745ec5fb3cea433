"""DenseCache: the per-sequence decode cache of the reference generate (the engine's paged cache is its fast twin).

The cache protocol the model's layers call (any object passed as `cache=` to Transformer.forward implements it):
  mla_attention(mla, q_nope, q_pe, latent) -> o   store the new latent, attend over everything cached (MLA layers)
  kda_state(layer) -> (conv windows, fp32 states)  one row per sequence (KDA layers)
  set_kda_state(layer, conv, state)                 store them back
  kda_slots(layer) -> (windows, states, rows)       optional: the layer's whole conv-window and state tensors and
                                                    each sequence's row in them, for in-place decode kernels
  cu_seqlens                                        None (rows are sequences) or [N+1] offsets of packed sequences
  advance(num_tokens)                               called once after each forward
  length                                            tokens already cached (default positions start here)

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
        self.rows = torch.arange(batch_size, device=device)  # row b of the KDA tensors is sequence b
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

    cu_seqlens = None  # rows are whole sequences (the engine's context packs them and sets this)

    def mla_attention(self, mla, q_nope, q_pe, latent) -> torch.Tensor:
        """Write latent [B, T, W] at positions length..length+T, then attend over the whole cached prefix."""
        start, end = self.length, self.length + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache overflow: {end} tokens exceed the cache's max_len {self.max_len}")
        buf = self.latent[mla.layer_idx]
        buf[:, start:end] = latent
        return mla.attend(q_nope, q_pe, buf[:, :end], start)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def kda_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv[layer], self.state[layer]

    def set_kda_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.conv[layer].copy_(conv)
        self.state[layer].copy_(state)

    def kda_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.conv[layer], self.state[layer], self.rows

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.latent, self.conv, self.state) for t in d.values())
