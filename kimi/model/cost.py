"""What a model costs, computed from its config alone (no weights needed): parameters total and active per token,
MLA latent-cache bytes per token, KDA state bytes per sequence, forward FLOPs per token at a given context.
`kimi info` prints these; benchmarks use them for MFU / roofline numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from kimi.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # per token: every dense parameter plus top-k routed experts (and the shared ones)
    embedding: int  # the input embedding (a lookup, no FLOPs)


def attention_params(cfg: ModelConfig, kind: str) -> int:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if kind == "mla":
        r, rope, qk = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_head_dim
        q = D * H * qk if cfg.q_lora_rank is None else D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
        return q + D * (r + rope) + r + r * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D
    Hk, K = cfg.kda_num_heads, cfg.kda_head_dim
    P = Hk * K
    return (3 * D * P + 3 * P * cfg.short_conv_kernel_size  # q/k/v projections and their short convs
            + D * K + K * P + Hk + P  # forget gate: f_a, f_b, A_log, dt_bias
            + D * Hk  # b_proj
            + D * K + K * P + K  # output gate g_a, g_b and the gated norm
            + P * D)  # o_proj


def param_count(cfg: ModelConfig) -> ParamCount:
    D, V = cfg.hidden_size, cfg.vocab_size
    expert = 3 * D * cfg.moe_intermediate_size
    total = active = 0
    for kind, mlp in zip(cfg.layer_types, cfg.mlp_types):
        dense = 2 * D + attention_params(cfg, kind)
        if mlp == "dense":
            dense += 3 * D * cfg.intermediate_size
            routed_total = routed_active = 0
        else:
            dense += cfg.n_routed_experts * D + cfg.n_routed_experts  # router weight + correction bias
            dense += cfg.n_shared_experts * expert
            routed_total, routed_active = cfg.n_routed_experts * expert, cfg.num_experts_per_tok * expert
        total += dense + routed_total
        active += dense + routed_active
    embed = V * D
    head = 0 if cfg.tie_word_embeddings else V * D
    return ParamCount(total=total + embed + head + D, active=active + embed + head + D, embedding=embed)


def mla_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """kv_lora_rank + qk_rope_head_dim latent values per token per MLA layer."""
    return cfg.num_mla_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes


def kda_state_bytes_per_sequence(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """Per KDA layer: the fp32 recurrent state [H, K, K] plus the short-conv windows [3P, kernel-1] (model dtype)."""
    H, K = cfg.kda_num_heads, cfg.kda_head_dim
    per_layer = H * K * K * 4 + 3 * H * K * (cfg.short_conv_kernel_size - 1) * dtype_bytes
    return cfg.num_kda_layers * per_layer


def flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Forward FLOPs for one token attending `context` earlier tokens (training: x3).

    2 x the active matmul parameters (everything active but the embedding lookup) plus attention: absorbed MLA over
    the latent, 2*H*(2*kv_lora + rope) per context token; KDA per head, the chunked form's
    6*K^2 + 3*C*K + C^2 with chunk C = 64 (kda.md §2, Eq. 13), independent of context.
    """
    p = param_count(cfg)
    flops = 2 * (p.active - p.embedding)
    H, r, rope = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    flops += cfg.num_mla_layers * 2 * H * (2 * r + rope) * context
    K, C = cfg.kda_head_dim, 64
    flops += cfg.num_kda_layers * cfg.kda_num_heads * (6 * K * K + 3 * C * K + C * C)
    return flops


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def describe(cfg: ModelConfig) -> str:
    """The `kimi info` report."""
    p = param_count(cfg)
    kinds = f"{cfg.num_mla_layers} MLA" + (f" + {cfg.num_kda_layers} KDA" if cfg.is_hybrid else "")
    lines = [
        f"model type:            {cfg.model_type} ({cfg.num_hidden_layers} layers: {kinds}; "
        f"{cfg.mlp_types.count('moe')} MoE with {cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok})",
        f"parameters, total:     {human(p.total)} ({p.total:,})",
        f"parameters, active:    {human(p.active)} per token ({human(p.active - p.embedding)} without the input "
        f"embedding)",
        f"MLA latent cache:      {mla_cache_bytes_per_token(cfg):,} bytes per token (bf16; "
        f"{cfg.kv_lora_rank + cfg.qk_rope_head_dim} values x {cfg.num_mla_layers} layers)",
    ]
    if cfg.is_hybrid:
        lines.append(f"KDA state:             {kda_state_bytes_per_sequence(cfg):,} bytes per sequence "
                     f"(fp32 state + bf16 conv windows, {cfg.num_kda_layers} layers; constant in length)")
    for ctx in (4096, 131072):
        lines.append(f"forward FLOPs/token:   {human(flops_per_token(cfg, ctx), 'FLOP')} at {ctx:,} tokens of context")
    return "\n".join(lines)
