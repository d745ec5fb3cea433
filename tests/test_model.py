"""Identity tests for the model's optimised forms: absorbed = expanded MLA, prefill + decode = one full forward,
the reference generate = greedy argmax of full forwards; fp32-kept tensors stay fp32."""

import pytest
import torch

from kimi.config import ModelConfig
from kimi.model.cache import DenseCache
from kimi.model.generate import generate
from kimi.model.mla import MLA
from kimi.model.model import build_model

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, initializer_range=0.08)


def k2_tiny(**kw):
    return ModelConfig.from_dict({"model_type": "kimi_k2", **TINY, "num_hidden_layers": 3, "n_routed_experts": 8,
                                  "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
                                  "q_lora_rank": 24, "routed_scaling_factor": 2.827, "rope_theta": 50000.0,
                                  "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                                                   "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                                                   "mscale_all_dim": 1.0}, **kw})


def kl_tiny(**kw):
    return ModelConfig.from_dict({"model_type": "kimi_linear", **TINY, "num_hidden_layers": 4, "num_experts": 8,
                                  "num_experts_per_token": 2, "routed_scaling_factor": 2.446,
                                  "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4],
                                                         "head_dim": 16, "num_heads": 4, "short_conv_kernel_size": 4},
                                  **kw})


FAMILIES = {"k2": k2_tiny, "kimi_linear": kl_tiny}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_prefill_then_decode_equals_full_forward(family, chunk):
    model = build_model(FAMILIES[family](), dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 50))
    with torch.no_grad():
        full = model(ids)
        cache = DenseCache(model.config, 2, 64, torch.float32)
        step = chunk or 30
        parts = [model(ids[:, s:min(s + step, 30)], cache=cache) for s in range(0, 30, step)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(30, 50)]
    err = (torch.cat(parts, 1) - full).abs().max().item()
    assert full.abs().max() > 0.5
    assert err <= 1e-4, err


@pytest.mark.parametrize("family", FAMILIES)
def test_absorbed_mla_equals_expanded(family):
    model = build_model(FAMILIES[family](), dtype=torch.float32).eval()
    mla = next(m for m in model.modules() if isinstance(m, MLA))
    x = torch.randn(2, 20, 64)
    pos = torch.arange(20)[None]
    outs = []
    for absorb in (False, True):
        mla.absorb = absorb
        cache = DenseCache(model.config, 2, 32, torch.float32)
        with torch.no_grad():
            prefix = mla(x[:, :12], pos[:, :12], cache)
            cache.length = 12
            outs.append(torch.cat([prefix, mla(x[:, 12:], pos[:, 12:], cache)], 1))
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_is_greedy_argmax_of_full_forward(family):
    model = build_model(FAMILIES[family](), dtype=torch.float32).eval()
    prompt = torch.randint(0, 96, (1, 9))
    out = generate(model, prompt, 12)[0]
    seq = torch.cat([prompt, torch.tensor([out])], 1)
    with torch.no_grad():
        logits = model(seq)
    assert logits[0, 8:-1].argmax(-1).tolist() == out


def test_seeded_sampling_is_reproducible():
    model = build_model(kl_tiny(), dtype=torch.float32).eval()
    a = generate(model, [5, 6, 7], 10, temperature=1.0, top_p=0.9, top_k=30, seed=3)
    b = generate(model, [5, 6, 7], 10, temperature=1.0, top_p=0.9, top_k=30, seed=3)
    c = generate(model, [5, 6, 7], 10, temperature=1.0, top_p=0.9, top_k=30, seed=4)
    assert a == b and a != c


def test_generate_rejects_bad_prompts():
    model = build_model(kl_tiny(), dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        generate(model, [5, 96], 4)


def test_bf16_model_keeps_gate_scalars_fp32():
    model = build_model(kl_tiny(), dtype=torch.bfloat16)
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for name, dt in dtypes.items():
        want = torch.float32 if name.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "e_score_correction_bias") else torch.bfloat16
        assert dt == want, name
    with torch.no_grad():
        assert model(torch.randint(0, 96, (1, 70))).dtype == torch.bfloat16


def test_parameter_names_are_checkpoint_names():
    names = set(dict(build_model(kl_tiny()).named_parameters()))
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense layer 0
    assert "model.layers.1.block_sparse_moe.experts.gate_proj" in names  # stacked experts
    assert "model.layers.3.self_attn.kv_b_proj.weight" in names and "model.layers.0.self_attn.A_log" in names
    names = set(dict(build_model(k2_tiny()).named_parameters()))
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in names
    assert "model.layers.0.self_attn.q_a_layernorm.weight" in names


class PackedStates:
    """The cache protocol for KDA layers over packed sequences (what the engine's context provides)."""

    def __init__(self, cu_seqlens, conv, state):
        self.cu_seqlens, self.conv, self.state = cu_seqlens, conv, state

    def kda_state(self, layer):
        return self.conv, self.state

    def set_kda_state(self, layer, conv, state):
        self.conv, self.state = conv, state


def test_kda_layer_packed_sequences_equal_separate_runs():
    from kimi.model.kda import KDA

    model = build_model(kl_tiny(), dtype=torch.float32).eval()
    kda = next(m for m in model.modules() if isinstance(m, KDA))
    lens = [5, 1, 12]
    xs = [torch.randn(1, n, 64) for n in lens]
    conv0 = torch.randn(3, 3 * 64, 3)
    state0 = torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        packed = PackedStates(torch.tensor([0, 5, 6, 18]), conv0.clone(), state0.clone())
        out = kda(torch.cat(xs, 1), cache=packed)
        for i, x in enumerate(xs):
            single = PackedStates(None, conv0[i:i + 1].clone(), state0[i:i + 1].clone())
            want = kda(x, cache=single)
            a, b = sum(lens[:i]), sum(lens[:i + 1])
            assert (out[:, a:b] - want).abs().max() <= 1e-5
            assert torch.allclose(packed.conv[i], single.conv[0], atol=1e-5) and torch.allclose(packed.state[i], single.state[0], atol=1e-5)


@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_moe_path_equals_the_grouped_path(k, dtype):
    """Experts' batch-1 shortcut does the grouped path's arithmetic in the same order: bit-for-bit the same."""
    from kimi.model.moe import Experts

    g = torch.Generator().manual_seed(k)
    experts = Experts(16, 32, 24).to(dtype)
    for p in experts.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    with torch.no_grad():
        for _ in range(20):
            x = torch.randn(1, 32, generator=g).to(dtype)
            idx = torch.randperm(16, generator=g)[:k][None]
            w = torch.rand(1, k, generator=g)
            assert torch.equal(experts(x, idx, w), experts._grouped(x, idx, w))


def test_absorbed_weights_follow_in_place_updates():
    mla = build_model(k2_tiny(), seed=0).model.layers[0].self_attn
    w_uk, w_uv_t = mla.absorbed_weights()
    H, r = mla.num_heads, mla.kv_lora_rank
    assert w_uk.shape == (H, mla.qk_nope_head_dim, r) and w_uv_t.shape == (H, r, mla.v_head_dim)
    assert mla.absorbed_weights()[0] is w_uk  # cached
    with torch.no_grad():
        mla.kv_b_proj.weight.mul_(2)
    w_uk2, _ = mla.absorbed_weights()
    assert torch.equal(w_uk2, 2 * w_uk)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_model_on_cuda_has_the_cpu_weights_and_logits(family):
    cpu, gpu = (build_model(FAMILIES[family](), seed=3, device=d).eval() for d in ("cpu", "cuda"))
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert torch.equal(a, b.cpu()), name
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = cpu(ids), gpu(ids.cuda()).cpu()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
