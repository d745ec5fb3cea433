"""kimi's built-in model: a tiny Kimi Linear model (KDA:MLA 3:1, NoPE MLA, MoE) with its own 2k BPE in Kimi's
exact token format, trained with MuonClip on toolverse data by runs/train_builtin.sh. It is what `kimi serve`,
`kimi chat` and `kimi generate` run when no --model is given. The directory `model/` is a normal HF-layout model
directory (config.json, model.safetensors, generation_config.json, tiktoken.model, tokenizer_config.json);
its scores are in model/eval.json.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"


def builtin_model_dir() -> Path:
    """The shipped model directory; ValueError if this installation lacks it."""
    if not (MODEL_DIR / "config.json").is_file() or not (MODEL_DIR / "tiktoken.model").is_file():
        raise ValueError(f"the built-in model is missing from {MODEL_DIR} (config.json and tiktoken.model expected); "
                         "reinstall kimi or pass --model DIR")
    return MODEL_DIR
