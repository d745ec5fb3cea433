"""kimi: the Kimi K2 and Kimi Linear model family in compact PyTorch.

The public surface is imported lazily so that `import kimi` (and the CLI) stay fast.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "ModelConfig": "kimi.config",
    "Transformer": "kimi.model.model",
    "load_model": "kimi.model.loader",
    "save_model": "kimi.model.loader",
    "Tokenizer": "kimi.tokenizer.tokenizer",
    "LLM": "kimi.engine.engine",
    "LLMEngine": "kimi.engine.engine",
    "RequestOutput": "kimi.engine.engine",
    "SamplingParams": "kimi.engine.sampling_params",
}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'kimi' has no attribute {name!r}")
