"""Parity with the reference implementations in transformers (DeepseekV3ForCausalLM, KimiLinearForCausalLM).

Each case builds a tiny random reference model, `save_pretrained`s it, loads that directory with kimi.load_model and
compares fp32 logits: max abs difference <= 1e-4. MoE cases run twice: with each model routing on its own, and
with kimi's routers pinned to the reference's expert choices, to tell routing flips from math errors.
"""

import pytest
import torch

import kimi
from kimi.model.moe import Router

transformers = pytest.importorskip("transformers")

TOL = 1e-4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, initializer_range=0.08,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def k2_config(**kw):
    return transformers.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3, "n_routed_experts": 8,
                                            "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1,
                                            "topk_group": 1, "routed_scaling_factor": 2.827, "q_lora_rank": 24,
                                            "max_position_embeddings": 512, "num_mtp_layers": 0, **kw})


def yarn(factor, beta_fast, beta_slow, original=32, theta=50000.0):
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": theta}


def kl_config(kda_layers, full_layers, **kw):
    n = len(kda_layers) + len(full_layers)
    return transformers.KimiLinearConfig(**{
        **COMMON, "num_hidden_layers": n, "num_experts": 8, "num_experts_per_token": 2, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.446, "q_lora_rank": None,
        "linear_attn_config": {"kda_layers": kda_layers, "full_attn_layers": full_layers, "head_dim": 16,
                               "num_heads": 4, "short_conv_kernel_size": 4}, **kw})


CASES = {
    # K2's own YaRN (beta 1/1: a hard step) with factor 32, positions well past the original context
    "k2-yarn32-step": (transformers.DeepseekV3ForCausalLM, lambda: k2_config(rope_parameters=yarn(32.0, 1.0, 1.0))),
    # DeepSeek-V3's smooth ramp, grouped routing n_group=4 / topk_group=2, q_lora_rank null
    "k2-yarn-ramp-grouped-noqlora": (transformers.DeepseekV3ForCausalLM, lambda: k2_config(
        rope_parameters=yarn(4.0, 32.0, 1.0, theta=10000.0), n_group=4, topk_group=2, q_lora_rank=None)),
    "k2-plain-rope": (transformers.DeepseekV3ForCausalLM, lambda: k2_config(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, first_k_dense_replace=2)),
    # the real 1-indexed Kimi Linear pattern scaled down: KDA x3, MLA, KDA x3, MLA
    "kimi-linear-3to1": (transformers.KimiLinearForCausalLM, lambda: kl_config([1, 2, 3, 5, 6, 7], [4, 8])),
    # another layout: MLA first, KDA last, grouped routing
    "kimi-linear-mla-first": (transformers.KimiLinearForCausalLM, lambda: kl_config(
        [2, 4], [1, 3], num_expert_group=2, topk_group=1)),
}


def build_reference(cls, config, path):
    torch.manual_seed(0)
    ref = cls(config).eval()
    with torch.no_grad():  # a non-zero selection bias, so "bias for selection only" is actually exercised
        for name, buf in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    ref.save_pretrained(path)
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def pin_routing(ours, ref):
    """Make each of kimi's routers return the reference router's choices for the same input."""
    ref_routers = [m for m in ref.modules() if type(m).__name__.endswith("TopkRouter")]
    our_routers = [m for m in ours.modules() if isinstance(m, Router)]
    assert len(ref_routers) == len(our_routers) > 0
    for mine, theirs in zip(our_routers, ref_routers):
        def forward(x, theirs=theirs):
            _, w, idx = theirs(x)
            return idx, w
        mine.forward = forward


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    cls, make = CASES[case]
    ref = build_reference(cls, make(), tmp_path)
    ours = kimi.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(3, 128, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
        err = (got - want).abs().max().item()
        pin_routing(ours, ref)
        err_pinned = (ours(ids) - want).abs().max().item()
    print(f"{case}: max|dlogit| = {err:.2e} (routing pinned: {err_pinned:.2e}), max|logit| = {want.abs().max():.2f}")
    assert want.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    assert err <= TOL and err_pinned <= TOL


@pytest.mark.parametrize("case", ["k2-yarn32-step", "kimi-linear-3to1"])
def test_saved_model_loads_in_transformers(case, tmp_path):
    cls, make = CASES[case]
    ref = build_reference(cls, make(), tmp_path / "ref")
    ours = kimi.load_model(tmp_path / "ref", dtype=torch.float32)
    kimi.save_model(ours, tmp_path / "ours", max_shard_bytes=200_000)  # force sharding with an index file
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    again = kimi.load_model(tmp_path / "ours", dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        want = ref(ids).logits
        assert (back(ids).logits - want).abs().max() <= TOL
        assert (again(ids) - want).abs().max() <= TOL
