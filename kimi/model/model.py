"""Transformer: embed -> layers (attention kind x mlp kind, per config) -> norm -> lm_head.

Single-device, eager PyTorch. Parameter names equal the checkpoint tensor names of the real models
(`model.layers.{i}.self_attn.kv_b_proj.weight`, ...), except that routed experts are stacked (model/moe.py), so
loading is an identity map plus one packing rule (model/loader.py). One forward serves training (full sequences,
autograd), the reference generate (DenseCache) and, later, the engine.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kimi.config import ModelConfig
from kimi.model.kda import KDA
from kimi.model.layers import MLP, RMSNorm
from kimi.model.mla import MLA
from kimi.model.moe import MoE, Router

# tensors that stay fp32 whatever the model dtype (kda.md §1.2, k2.md §4)
FP32_NAMES = (*KDA.FP32_PARAMS, *Router.FP32_PARAMS)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, i) if cfg.layer_types[i] == "mla" else KDA(cfg, i)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # the FFN's checkpoint name: `mlp` for dense layers and K2 MoE, `block_sparse_moe` for Kimi Linear MoE
        self.ffn_name = cfg.moe_module_name if cfg.mlp_types[i] == "moe" else "mlp"
        ffn = MoE(cfg) if cfg.mlp_types[i] == "moe" else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.add_module(self.ffn_name, ffn)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + self._modules[self.ffn_name](self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Holds the `model.` prefix of checkpoint names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. positions default to cache.length + arange(T).

        logits_at: indices into the flattened B*T tokens; then only those rows go through the final norm and lm_head
        and the result is [len(logits_at), vocab] (the engine samples one token per sequence, not per prompt token).
        """
        T = input_ids.shape[1]
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device)[None]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, positions, cache)
        if cache is not None:
            cache.advance(T)
        if logits_at is not None:
            x = x.flatten(0, 1)[logits_at]
        return self.lm_head(self.model.norm(x))

    # ---- dtype and initialisation --------------------------------------------------------------------------
    def cast(self, dtype: torch.dtype) -> "Transformer":
        """Convert floating tensors to dtype, except the ones that must stay fp32 (FP32_NAMES) and those of
        quantised modules (FP8/INT4 weights and their scales keep their formats)."""
        for module in self.modules():
            if getattr(module, "quantized", False):
                continue
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if t.is_floating_point():
                    t.data = t.data.to(torch.float32 if name in FP32_NAMES else dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:  # from the embedding: lm_head may be packed (kimi/ops/packed_linear.py)
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "Transformer":
        """Random init for models trained or tested from scratch (normal(0, initializer_range) matrices, unit norms,
        FLA's KDA gate init: A_log = log U(1, 16), dt_bias = softplus^-1 of dt ~ logU(1e-3, 1e-1))."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range

        def draw(p):  # drawn on the CPU whatever p's device: one seed gives the same weights on every device
            return torch.empty(p.shape, dtype=p.dtype, device="cpu")

        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, KDA) and name == "A_log":
                    p.copy_(draw(p).uniform_(1, 16, generator=gen).log())
                elif isinstance(module, KDA) and name == "dt_bias":
                    dt = draw(p).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
                    dt = dt.clamp_min(1e-4)
                    p.copy_(dt + torch.log(-torch.expm1(-dt)))
                elif name == "weight" and p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(draw(p).normal_(0, std, generator=gen))
            for name, b in module.named_buffers(recurse=False):
                b.zero_()
        return self


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu", seed: int | None = 0):
    """A randomly initialised model (for tests and training from scratch)."""
    with torch.device(device):
        model = Transformer(cfg)
    return model.init_weights(seed).cast(dtype)
