"""The default compute dtype follows the hardware (kimi/ops/dtypes.py): bf16 where the CPU's oneDNN has bf16
kernels, fp32 where bf16 would be emulated; the engine loads a directory in it and `kimi train --autocast auto`
autocasts only where it is native; an explicit dtype always wins. Both answers of the CPU check are simulated, so
this runs the same on every CPU."""

import argparse
import contextlib

import pytest
import torch

from kimi.config import ModelConfig
from kimi.engine.engine import LLM
from kimi.engine.sampling_params import SamplingParams
from kimi.model.loader import save_model
from kimi.model.model import build_model
from kimi.ops import dtypes
from kimi.train.trainer import add_train_arguments, autocast

TINY = {"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "max_position_embeddings": 128,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "torch_dtype": "bfloat16"}


@pytest.fixture(params=[False, True], ids=["cpu_without_bf16", "cpu_with_bf16"])
def native_bf16(request, monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_has_bf16_kernels", lambda: request.param)
    dtypes._bf16_is_fast.cache_clear()
    yield request.param
    dtypes._bf16_is_fast.cache_clear()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_checkpoint")
    save_model(build_model(ModelConfig.from_dict(TINY), dtype=torch.bfloat16, seed=0), out)
    return out


def test_default_dtype_follows_the_cpu(native_bf16):
    assert dtypes.bf16_is_fast("cpu") is native_bf16
    assert dtypes.default_dtype(torch.device("cpu")) == (torch.bfloat16 if native_bf16 else torch.float32)


def test_the_engine_loads_a_bf16_checkpoint_in_the_default_dtype(native_bf16, model_dir):
    llm = LLM(str(model_dir), max_num_seqs=2, max_model_len=64, pack_weights=False)
    assert llm.model.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    assert LLM(str(model_dir), dtype="bfloat16", max_num_seqs=2, max_model_len=64,
               pack_weights=False).model.dtype == torch.bfloat16  # an explicit dtype wins


def test_train_autocast_auto_is_bf16_only_where_native(native_bf16):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    base = ["--data", "d", "--out", "o", "--steps", "1", "--batch-tokens", "8", "--seq-len", "8"]
    args = p.parse_args(base)
    assert args.autocast == "auto"
    ctx = autocast(args, torch.device("cpu"))
    if native_bf16:
        with ctx:
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    else:
        assert isinstance(ctx, contextlib.nullcontext)
    with autocast(p.parse_args(base + ["--autocast", "bf16"]), torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")  # forced either way
    assert isinstance(autocast(p.parse_args(base + ["--autocast", "none"]), torch.device("cpu")),
                      contextlib.nullcontext)
