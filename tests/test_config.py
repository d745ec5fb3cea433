"""ModelConfig reads every Kimi config form, derives the per-layer plan, and rejects bad configs by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kimi.config import ModelConfig
from kimi.model.cost import kda_state_bytes_per_sequence, mla_cache_bytes_per_token, param_count

FIX = Path(__file__).parent / "fixtures"
K2 = json.loads((FIX / "kimi-k2-instruct.config.json").read_text())
KL = json.loads((FIX / "kimi-linear-48b-a3b.config.json").read_text())


def test_k2_instruct_real_config():
    c = ModelConfig.from_dict(K2)
    assert c.model_type == "deepseek_v3" and c.layer_types == ("mla",) * 61
    assert c.mlp_types[0] == "dense" and set(c.mlp_types[1:]) == {"moe"}
    assert c.rope_scaling.factor == 32 and c.qk_head_dim == 192
    assert c.softmax_scale == pytest.approx(192**-0.5 * 1.34657359**2, rel=1e-6)  # k2.md §2.2: 0.130861
    p = param_count(c)
    assert p.total == pytest.approx(1.0264e12, rel=1e-3) and p.active == pytest.approx(32.9e9, rel=2e-3)
    assert mla_cache_bytes_per_token(c) == 70_272  # 576 values x 61 layers x bf16 (k2.md §2.3)


def test_kimi_linear_real_config():
    c = ModelConfig.from_dict(KL)
    mla = [i for i, t in enumerate(c.layer_types) if t == "mla"]
    assert mla == [3, 7, 11, 15, 19, 23, 26]  # 1-indexed lists in the file, 0-indexed here
    assert not c.use_rope and c.q_lora_rank is None and c.moe_module_name == "block_sparse_moe"
    p = param_count(c)
    assert p.total == 49_122_681_728  # kda.md §0, exact
    assert p.active - p.embedding == pytest.approx(3.11e9, rel=5e-3)
    assert mla_cache_bytes_per_token(c) == 8_064
    assert kda_state_bytes_per_sequence(c) == 20 * (2_097_152 + 73_728)  # kda.md §1.6


def test_layer_types_form_and_k25_wrapper():
    hf5 = {k: v for k, v in KL.items() if k != "linear_attn_config"}
    hf5["layer_types"] = ["full_attention" if i in (3, 7, 11, 15, 19, 23, 26) else "linear_attention"
                          for i in range(27)]
    hf5["linear_head_dim"], hf5["linear_num_heads"] = 128, 32
    assert ModelConfig.from_dict(hf5).layer_types == ModelConfig.from_dict(KL).layer_types
    k25 = {"model_type": "kimi_k25", "text_config": {**K2, "model_type": "kimi_k2"}, "vision_config": {}}
    assert param_count(ModelConfig.from_dict(k25)) == param_count(ModelConfig.from_dict(K2))


def test_hf_v5_rope_parameters_form():
    d = {k: v for k, v in K2.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**K2["rope_scaling"], "rope_type": "yarn", "rope_theta": 50000.0}
    assert ModelConfig.from_dict(d).rope_scaling == ModelConfig.from_dict(K2).rope_scaling


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_experts_per_tok": 400}, "num_experts_per_tok"),
    ({"n_group": 5}, "n_group"),
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}}, "factor"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type"),
    ({"vocab_size": "big"}, "vocab_size"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"scoring_func": "softmax"}, "scoring_func"),
])
def test_bad_k2_configs_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**K2, **change})


@pytest.mark.parametrize("lac, match", [
    ({"kda_layers": [0, 1, 2], "full_attn_layers": [3]}, "1-indexed"),
    ({"kda_layers": [1, 2], "full_attn_layers": [2, 3]}, "both"),
    ({"kda_layers": [1], "full_attn_layers": [3]}, "neither"),
])
def test_bad_kimi_linear_layer_lists(lac, match):
    d = {**KL, "num_hidden_layers": 3,
         "linear_attn_config": {**lac, "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4}}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(d)


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_kimi_info_cli():
    run = lambda f: subprocess.run([sys.executable, "-m", "kimi", "info", str(FIX / f)], capture_output=True,
                                   text=True, check=True).stdout
    k2, kl = run("kimi-k2-instruct.config.json"), run("kimi-linear-48b-a3b.config.json")
    assert "1.03T" in k2 and "32.9B per token" in k2 and "70,272 bytes per token" in k2
    assert "49.1B" in kl and "3.11B without the input embedding" in kl and "KDA state" in kl
