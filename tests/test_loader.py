"""load_model / save_model: round trips in bf16 and fp32, and every kind of bad checkpoint is a clear ValueError."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import kimi
from kimi.model.model import build_model
from tests.test_model import k2_tiny, kl_tiny


@pytest.fixture
def saved(tmp_path):
    model = build_model(kl_tiny(), dtype=torch.bfloat16)
    kimi.save_model(model, tmp_path)
    return model, tmp_path


def test_round_trip_bf16_keeps_fp32_tensors(saved):
    model, path = saved
    back = kimi.load_model(path)
    assert back.dtype == torch.bfloat16 and back.model.layers[0].self_attn.A_log.dtype == torch.float32
    for (n, a), (m, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b), n
    stored = load_file(path / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in stored  # Kimi Linear's per-expert names
    assert stored["model.layers.0.self_attn.dt_bias"].dtype == torch.float32


def test_k2_naming_and_dense_layer_under_block_sparse_moe(tmp_path):
    kimi.save_model(build_model(k2_tiny()), tmp_path)
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in load_file(tmp_path / "model.safetensors")
    model = build_model(kl_tiny())
    kimi.save_model(model, tmp_path / "kl")
    state = load_file(tmp_path / "kl" / "model.safetensors")
    # transformers 5 writes Kimi Linear's dense layer 0 under block_sparse_moe; the original checkpoint under mlp
    state = {k.replace("layers.0.mlp.", "layers.0.block_sparse_moe."): v for k, v in state.items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # ignored
    save_file(state, tmp_path / "kl" / "model.safetensors")
    back = kimi.load_model(tmp_path / "kl", dtype=torch.float32)
    assert torch.equal(back.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.gate_proj.weight)


def rewrite(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors")


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.pop("model.layers.2.self_attn.q_proj.weight"), "lacks"),
    (lambda s: s.pop("model.layers.1.block_sparse_moe.experts.5.w1.weight"), "experts"),
    (lambda s: s.update({"model.layers.0.self_attn.bogus.weight": torch.zeros(2)}), "bogus"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(63)}), r"model\.norm\.weight.*\(63,\).*\(64,\)"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}), "dtype"),
])
def test_bad_tensors_are_named(saved, mutate, match):
    _, path = saved
    rewrite(path, mutate)
    with pytest.raises(ValueError, match=match):
        kimi.load_model(path)


def test_truncated_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        kimi.load_model(path)


def test_missing_shard(tmp_path):
    kimi.save_model(build_model(kl_tiny()), tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(ValueError, match=victim):
        kimi.load_model(tmp_path)


def test_pickles_are_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(kl_tiny().to_hf_dict()))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        kimi.load_model(tmp_path)
