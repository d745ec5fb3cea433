"""QK-Clip (kimi/train/qk_clip.py) on the real MLA module (kimi/model/mla.py): after a clip, the same batch
gives logits of exactly γ× the old ones for clipped heads, and every other head and weight is bit-identical;
maxima are recorded per layer, over micro-batches, and all-reduced over data-parallel ranks. muon.md §2."""

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from kimi.config import ModelConfig
from kimi.model.mla import MLA, causal_mask
from kimi.model.model import build_model
from kimi.train.optim import build_optimizer
from kimi.train.qk_clip import QKClip, attention_layers, clip_mla_

K2 = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
          num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
          v_head_dim=6, n_routed_experts=0)
# Kimi Linear's MLA: plain q_proj, NoPE (the rope slice exists but is not rotated).
NOPE = dict(q_lora_rank=None, use_rope=False)


def _mla(dtype, variant):
    cfg = ModelConfig.from_dict(K2)
    if variant:
        cfg = cfg.replace(**variant)
    torch.manual_seed(0)
    attn = MLA(cfg, 0).to(dtype)
    with torch.no_grad():
        for p in attn.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5)  # large enough logits for the clip to have something to do
    return nn.ModuleDict({"attn": attn})


def _logits(attn, x, positions):
    """Every pre-softmax logit [B, H, T, T], softmax scale included, -inf where causally masked."""
    with torch.no_grad():
        q_nope, q_pe, latent = attn.project(x, positions)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, qk]
        k, _ = attn.expand(latent)  # [B, H, T, qk]
        s = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
        return s.masked_fill(~causal_mask(x.shape[1], x.shape[1], 0, x.device, always=True), -math.inf)


@pytest.mark.parametrize("variant", [{}, NOPE], ids=["k2-rope-qlora", "kimi-linear-nope"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_scales_clipped_heads_by_gamma_and_leaves_the_rest_bit_identical(variant, dtype):
    model = _mla(dtype, variant)
    attn = model["attn"]
    clip = QKClip(model, tau=None)
    assert attn.record_max_logits
    x = torch.randn(2, 9, 32, dtype=dtype)
    positions = torch.arange(9)[None]
    attn.train()(x, positions)
    old = _logits(attn, x, positions)
    recorded = attn.max_logits.clone()
    torch.testing.assert_close(recorded, old.amax(dim=(0, 2, 3)).float())

    # A threshold between the heads' maxima: some heads clip, some do not.
    tau = recorded.median().item()
    clipped = recorded > tau
    assert 0 < clipped.sum() < attn.num_heads
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clip.tau = tau
    maxima = clip()
    assert set(maxima) == {"attn"} and torch.equal(maxima["attn"], recorded)
    assert attn.max_logits is None  # reset for the next step

    new = _logits(attn, x, positions)
    gamma = (tau / recorded.double()).to(dtype)
    # Exact up to rounding: fp64 rounding where everything runs in fp64; MLA rotates q_pe/k_pe in fp32 whatever
    # the model dtype, so with RoPE the logits carry fp32 rounding (relative to the logits' scale).
    scale = old.nan_to_num(neginf=0).abs().max().item()
    exact = dtype == torch.float64 and variant == NOPE
    tol = dict(rtol=1e-12, atol=1e-12 * scale) if exact else dict(rtol=1e-5, atol=1e-6 * scale)
    for h in range(attn.num_heads):
        if clipped[h]:
            torch.testing.assert_close(new[:, h], old[:, h] * gamma[h], **tol)
        else:
            assert torch.equal(new[:, h], old[:, h])

    # Weights: only the q and k_nope rows of clipped heads move; the shared rope key, v rows, norms,
    # down-projections and o_proj are bit-identical.
    H, nope, rope, v = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    q_name = "attn.q_proj.weight" if "q_lora_rank" in variant else "attn.q_b_proj.weight"
    for name, p in model.named_parameters():
        if name not in (q_name, "attn.kv_b_proj.weight"):
            assert torch.equal(p, before[name]), name
    q_new, q_old = model.get_parameter(q_name).view(H, nope + rope, -1), before[q_name].view(H, nope + rope, -1)
    kv_new, kv_old = attn.kv_b_proj.weight.view(H, nope + v, -1), before["attn.kv_b_proj.weight"].view(H, nope + v, -1)
    assert torch.equal(kv_new[:, nope:], kv_old[:, nope:])
    for h in range(H):
        if clipped[h]:
            # the factors are gamma and sqrt(gamma) computed in fp64 and rounded once to the weights' dtype
            g64 = tau / recorded[h].double()
            g, root = g64.to(dtype), g64.sqrt().to(dtype)
            torch.testing.assert_close(q_new[h, :nope], q_old[h, :nope] * root, rtol=0, atol=0)
            torch.testing.assert_close(q_new[h, nope:], q_old[h, nope:] * g, rtol=0, atol=0)
            torch.testing.assert_close(kv_new[h, :nope], kv_old[h, :nope] * root, rtol=0, atol=0)
        else:
            assert torch.equal(q_new[h], q_old[h]) and torch.equal(kv_new[h], kv_old[h])

    # The next forward on the same batch records tau for the clipped heads.
    attn(x, positions)
    again = attn.max_logits
    torch.testing.assert_close(again[clipped], torch.full_like(again[clipped], tau), rtol=1e-5, atol=0)
    assert torch.equal(again[~clipped], recorded[~clipped])


def test_recording_is_a_running_max_over_micro_batches_and_skips_eval():
    model = _mla(torch.float32, {})
    attn = model["attn"]
    clip = QKClip(model, tau=None)
    positions = torch.arange(7)[None]
    xs = [torch.randn(1, 7, 32) for _ in range(3)]
    for x in xs:
        attn.train()(x, positions)
    attn.eval()(torch.randn(1, 7, 32) * 100, positions)  # evaluation forwards do not count
    expected = torch.stack([_logits(attn, x, positions).amax(dim=(0, 2, 3)) for x in xs]).amax(0)
    torch.testing.assert_close(clip()["attn"], expected)
    assert clip() == {}  # nothing recorded since the last call


def test_no_clip_below_tau_and_without_a_threshold():
    model = _mla(torch.float32, {})
    before = [p.detach().clone() for p in model.parameters()]
    x, positions = torch.randn(2, 5, 32), torch.arange(5)[None]
    for tau in (None, 1e6):
        clip = QKClip(model, tau=tau)
        model["attn"].train()(x, positions)
        assert clip()["attn"].shape == (4,)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_muonclip_step_clips_after_the_update_and_logs_every_mla_layer():
    cfg = ModelConfig.from_dict({**K2, "num_hidden_layers": 2})
    model = build_model(cfg, seed=0).train()
    with torch.no_grad():
        for _, layer in attention_layers(model):
            layer.q_b_proj.weight.mul_(50)  # logits ~10: tau = 5 fires
            layer.kv_b_proj.weight.mul_(50)
    opt = build_optimizer(model, optimizer="muonclip", lr=1e-3, qk_clip_tau=5.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert set(opt.max_logits) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert max(m.max().item() for m in opt.max_logits.values()) > 5.0
    model(ids[:, :-1])
    for _, layer in attention_layers(model):
        # Clipped on the post-update weights with the pre-update maxima: close to tau, not a hard bound.
        assert layer.max_logits.max().item() < 5.0 * 1.2


def test_bad_input():
    with pytest.raises(ValueError, match="tau"):
        QKClip(nn.Linear(2, 2), tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        QKClip(nn.Linear(2, 2), tau=math.inf)
    with pytest.raises(ValueError, match="one factor per head"):
        clip_mla_(_mla(torch.float32, {})["attn"], torch.ones(3))


def _dp_worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)  # two ranks share the CPU cores
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _mla(torch.float32, {})
        fully_shard(model["attn"])  # dim-0 row shards: a head's q/kv_b rows can straddle ranks
        clip = QKClip(model, tau=None)
        torch.manual_seed(100 + rank)  # each rank sees different data
        x, positions = torch.randn(1, 6, 32), torch.arange(6)[None]
        model["attn"].train()(x, positions).square().sum().backward()  # FSDP2 reshards after backward
        local = model["attn"].max_logits.clone()
        clip.tau = 2.0
        maxima = clip()
        weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
        torch.save({"local": local, "reduced": maxima["attn"], "weights": weights},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # spawned FSDP2 ranks sometimes abort at process exit (C++ thread teardown) on this CPU box
def test_fsdp2_ranks_all_reduce_maxima_and_clip_the_full_rows():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2))
    assert not torch.equal(r0["local"], r1["local"])
    expected = torch.maximum(r0["local"], r1["local"])
    assert torch.equal(r0["reduced"], expected) and torch.equal(r1["reduced"], expected)
    # The sharded clip equals a single-process clip of the same model with the same factors, bit for bit.
    reference = _mla(torch.float32, {})
    m = expected.double()
    clip_mla_(reference["attn"], torch.where(m > 2.0, 2.0 / m, torch.ones_like(m)))
    assert (expected > 2.0).any()
    for name, w in reference.state_dict().items():
        assert torch.equal(r0["weights"][name], w), name
