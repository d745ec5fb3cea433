"""The demo model `kimi generate` builds when no --model is given: a tiny Kimi Linear model (KDA:MLA 3:1, MoE) with
its own BPE tokenizer in Kimi's exact token format, written as a real HF-layout model directory.

Its weights are random (it shows the whole load -> tokenise -> generate path working, not language); kimi's trained
built-in model replaces it once it exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("kimi")

DEMO_CONFIG = {
    "model_type": "kimi_linear", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 704,
    "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "kv_lora_rank": 64,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "num_experts": 8, "num_experts_per_token": 2,
    "num_shared_experts": 1, "routed_scaling_factor": 2.446, "first_k_dense_replace": 1, "rms_norm_eps": 1e-5,
    "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 32, "num_heads": 4,
                           "short_conv_kernel_size": 4},
    "model_max_length": 4096, "torch_dtype": "bfloat16",
}


def ensure_demo_model(out_dir: str | Path) -> Path:
    """Build the demo model directory once (a few seconds); later calls reuse it."""
    from kimi.config import ModelConfig
    from kimi.model.loader import save_model
    from kimi.model.model import build_model
    from kimi.tokenizer.bpe import train_tokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tiktoken.model").is_file():
        return out
    log.warning("building the demo model (random weights) in %s", out)
    corpus = sorted(str(p) for p in Path(__file__).parent.rglob("*.py"))  # kimi's own source: always at hand
    tok = train_tokenizer(corpus, DEMO_CONFIG["vocab_size"], str(out))
    cfg = ModelConfig.from_dict({**DEMO_CONFIG, "vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id,
                                 "eos_token_id": tok.im_end_id, "pad_token_id": tok.special_id("[PAD]")})
    save_model(build_model(cfg, dtype=torch.bfloat16, seed=0), out)
    return out


def default_model_dir(demo_dir: str | Path) -> Path:
    """The model `kimi serve` / `kimi chat` / `kimi generate` run without --model: the built-in trained model when
    this installation ships one, else the random-weight demo model (built on first use)."""
    from kimi.builtin import builtin_model_dir

    try:
        return builtin_model_dir()
    except ValueError:
        return ensure_demo_model(demo_dir)
