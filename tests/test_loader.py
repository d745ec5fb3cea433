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


# ---- quantised checkpoints and corrupt files ----------------------------------------------------------------------
from tests.test_checkpoints import K2_THINKING_QC, tiny, write_k2_instruct, write_k2_thinking  # noqa: E402


@pytest.fixture
def fp8_dir(tmp_path):
    write_k2_instruct(build_model(tiny("k2"), dtype=torch.bfloat16), tmp_path / "fp8")
    return tmp_path / "fp8"


@pytest.fixture
def int4_dir(tmp_path):
    write_k2_thinking(build_model(tiny("kimi_linear"), dtype=torch.bfloat16), tmp_path / "int4")
    return tmp_path / "int4"


def set_qc(path, change):
    cfg = json.loads((path / "config.json").read_text())
    change(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("which, change, match", [
    ("fp8", lambda q: q.update(quant_method="gptq"), "quant_method 'gptq'"),
    ("fp8", lambda q: q.update(weight_block_size=[128, 64]), "weight_block_size"),
    ("fp8", lambda q: q.update(activation_scheme="static"), "activation_scheme"),
    ("fp8", lambda q: q.update(fmt="e5m2"), "fmt"),
    ("fp8", lambda q: q.update(extra_thing=1), "extra_thing"),
    ("int4", lambda q: q.update(format="int-quantized"), "format"),
    ("int4", lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8), "num_bits"),
    ("int4", lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), "symmetric"),
    ("int4", lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), "actorder"),
    ("int4", lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "input_activations"),
    ("int4", lambda q: q.update(ignore=["re:(unclosed"]), "regex"),
])
def test_unsupported_quantization_config(fp8_dir, int4_dir, which, change, match):
    path = fp8_dir if which == "fp8" else int4_dir
    set_qc(path, change)
    with pytest.raises(ValueError, match=match) as e:
        kimi.load_model(path)
    assert "config.json" in str(e.value)


def test_ignore_list_decides_what_is_int4(int4_dir):
    # without the shared-experts rule, the checkpoint's bf16 shared experts contradict the config
    set_qc(int4_dir, lambda q: q.update(ignore=[p for p in K2_THINKING_QC["ignore"] if "shared" not in p]))
    with pytest.raises(ValueError, match=r"shared_experts\.\w+\.weight' .*quantised.*weight_packed.*dense"):
        kimi.load_model(int4_dir)


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.pop("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"),
     r"lacks tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight_scale_inv'"),
    (lambda s: s.update({"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(2, 1)}),
     r"o_proj\.weight_scale_inv.*\(2, 1\).*\(1, 1\)"),
    (lambda s: s.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}),
     r"o_proj\.weight.*bfloat16.*float8_e4m3fn"),
    (lambda s: s.update({"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1, dtype=torch.bfloat16)}),
     r"o_proj\.weight_scale_inv.*bfloat16.*float32"),
])
def test_bad_fp8_tensors_are_named(fp8_dir, mutate, match):
    rewrite(fp8_dir, mutate)
    with pytest.raises(ValueError, match=match):
        kimi.load_model(fp8_dir)


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.update({"model.layers.2.block_sparse_moe.experts.4.w2.weight_shape": torch.tensor([64, 31],
                         dtype=torch.int32)}), r"experts\.4\.w2\.weight_shape.*\[64, 31\].*\[64, 32\]"),
    (lambda s: s.update({"model.layers.2.block_sparse_moe.experts.4.w2.weight_packed": torch.zeros(64, 4,
                         dtype=torch.int64)}), r"w2\.weight_packed.*int64.*int32"),
    (lambda s: s.pop("model.layers.1.block_sparse_moe.experts.0.w1.weight_scale"), r"experts\.0\.w1\.weight_scale'"),
])
def test_bad_int4_tensors_are_named(int4_dir, mutate, match):
    rewrite(int4_dir, mutate)
    with pytest.raises(ValueError, match=match):
        kimi.load_model(int4_dir)


def test_quantised_tensors_without_quantization_config(fp8_dir):
    cfg = json.loads((fp8_dir / "config.json").read_text())
    del cfg["quantization_config"]
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config"):
        kimi.load_model(fp8_dir)


def test_corrupt_headers_are_named(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[20:30] = b"\xff" * 10  # inside the JSON header
    (path / "model.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="model.safetensors.*corrupt"):
        kimi.load_model(path)
    (path / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="model.safetensors.*header length"):
        kimi.load_model(path)


def test_truncated_file_names_the_tensor(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated: tensor '.*' ends at byte"):
        kimi.load_model(path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_pickle_files_are_never_loaded(tmp_path, suffix):
    (tmp_path / "config.json").write_text(json.dumps(kl_tiny().to_hf_dict()))
    torch.save({"x": torch.zeros(1)}, tmp_path / f"model{suffix}")
    with pytest.raises(ValueError, match=f"model{suffix}.*pickle"):
        kimi.load_model(tmp_path)


def test_index_pointing_at_a_pickle_shard(saved):
    _, path = saved
    names = list(load_file(path / "model.safetensors"))
    torch.save({}, path / "pytorch_model-00001.bin")
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: ("pytorch_model-00001.bin" if i == 0 else "model.safetensors") for i, n in enumerate(names)}}))
    with pytest.raises(ValueError, match="pytorch_model-00001.bin.*pickle"):
        kimi.load_model(path)


def test_bad_arguments(saved):
    _, path = saved
    with pytest.raises(ValueError, match="quantized='fast'"):
        kimi.load_model(path, quantized="fast")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        kimi.load_model(path, dtype="int8")
    with pytest.raises(ValueError, match="format 'int8'"):
        kimi.save_model(kimi.load_model(path), path / "out", format="int8")
