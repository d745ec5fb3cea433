"""MuonAdamW (kimi/train/optim.py): the AdamW half against torch.optim.AdamW, the Muon half against
torch.optim.Muon, Newton–Schulz against the SVD polar factor, per-expert orthogonalisation of stacked
experts, parameter routing and its assertions, state round trips. Math: shared/reference/muon.md."""

import io
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from kimi.train import optim
from kimi.train.optim import MuonAdamW, build_optimizer, build_param_groups, newton_schulz, param_kind

TORCH_SCALE = {"moonlight": "match_rms_adamw", "keller": "original"}


def _random_spectrum(shape, low, high, generator=None):
    """[..., A, B] matrices U·diag(s)·Vᵀ with singular values s uniform in [low, high]; returns (G, U, V)."""
    *batch, rows, cols = shape
    n = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(*batch, rows, n, dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(*batch, cols, n, dtype=torch.float64, generator=generator))
    s = torch.empty(*batch, n, dtype=torch.float64).uniform_(low, high, generator=generator)
    return (u * s[..., None, :]) @ v.mT, u, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 64), (3, 40, 24)])
def test_newton_schulz_is_close_to_the_polar_factor(shape, dtype):
    g, u, v = _random_spectrum(shape, 0.2, 2.0)  # condition number 10
    out = newton_schulz(g.float(), dtype=dtype)
    assert out.dtype == dtype and out.shape == g.shape
    out = out.double()
    # Five quintic steps do not converge: singular values land in ~[0.68, 1.13] (muon.md §1.2), plus bf16 noise.
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.2, (sv.min().item(), sv.max().item())
    # Same singular vectors as the input: Uᵀ·out·V is diagonal up to bf16 rounding.
    core = u.mT @ out @ v
    off = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
    assert off.abs().max() < 0.05
    polar = u @ v.mT
    cos = (out * polar).sum((-2, -1)) / (out.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cos.min() > 0.97


def test_newton_schulz_on_gaussian_and_zero_matrices():
    out = newton_schulz(torch.randn(64, 256)).double()
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.2
    zero = newton_schulz(torch.zeros(8, 16))
    assert torch.equal(zero, torch.zeros_like(zero))  # 0 / eps, not NaN
    with pytest.raises(ValueError, match="matrices"):
        newton_schulz(torch.randn(5))


def test_newton_schulz_normalises_each_expert_on_its_own():
    # Experts whose gradients differ by 1e6 in scale: per-matrix normalisation keeps each one in the band;
    # one Frobenius norm over the slab would leave the small expert's output near zero.
    g = torch.stack([_random_spectrum((24, 40), 1.0, 2.0)[0].float() * s for s in (1e-3, 1.0, 1e3)])
    out = newton_schulz(g).double()
    for e in range(3):
        sv = torch.linalg.svdvals(out[e])
        assert sv.min() > 0.6 and sv.max() < 1.2
        assert torch.equal(out[e], newton_schulz(g[e]).double())


def _run_pair(ours, theirs, p, q, steps, grad_shape):
    for _ in range(steps):
        g = torch.randn(grad_shape)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()


@pytest.mark.parametrize("scale", ["moonlight", "keller"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(48, 32), (32, 80)])
def test_muon_half_matches_torch_muon(scale, nesterov, shape):
    p = nn.Parameter(torch.randn(shape))
    q = nn.Parameter(p.detach().clone())
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    ours = MuonAdamW([dict(params=[p], kind="muon", scale=scale, **hyper)], ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon([q], adjust_lr_fn=TORCH_SCALE[scale], **hyper)
    _run_pair(ours, theirs, p, q, 6, shape)
    torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"], rtol=0, atol=0)
    assert not torch.equal(p, torch.zeros_like(p))


@pytest.mark.parametrize("batch_numel", [None, 48 * 32 * 2])
def test_same_shape_matrices_batched_match_torch_muon_one_by_one(batch_numel, monkeypatch):
    # One group holding several matrices of each shape: stacked Newton–Schulz (in batches of at most
    # batch_numel elements) must equal the per-matrix reference exactly.
    if batch_numel is not None:
        monkeypatch.setattr(optim, "NS_BATCH_NUMEL", batch_numel)
    shapes = [(48, 32), (32, 80), (48, 32), (48, 32), (32, 80), (48, 32), (7, 5)]
    ps = [nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    ours = MuonAdamW([dict(params=ps, kind="muon", lr=0.02, weight_decay=0.1)], ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon(qs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape) * torch.rand(()) * 10
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_stacked_experts_match_torch_muon_per_expert():
    E, shape = 3, (24, 40)
    p = nn.Parameter(torch.randn(E, *shape))
    qs = [nn.Parameter(p.detach()[e].clone()) for e in range(E)]
    ours = MuonAdamW([dict(params=[p], kind="muon", lr=0.05, weight_decay=0.1)], ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon(qs, lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(4):
        g = torch.randn(E, *shape) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
        p.grad = g.clone()
        for e, q in enumerate(qs):
            q.grad = g[e].clone()
        ours.step()
        theirs.step()
    for e, q in enumerate(qs):
        torch.testing.assert_close(p.detach()[e], q.detach(), rtol=0, atol=0)
    # The test can tell: one Newton–Schulz over the [E·A, B] slab gives a different update.
    g = torch.randn(E, *shape)
    assert not torch.allclose(newton_schulz(g).float(), newton_schulz(g.reshape(-1, shape[1])).float().view_as(g),
                              atol=1e-2)


@pytest.mark.parametrize("shape", [(17,), (5, 7), (8, 1, 4), (1, 1, 3, 1)])
def test_adamw_half_matches_torch_adamw(shape):
    p = nn.Parameter(torch.randn(shape))
    q = nn.Parameter(p.detach().clone())
    hyper = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    ours = MuonAdamW([dict(params=[p], kind="adamw", **hyper)])
    theirs = torch.optim.AdamW([q], foreach=False, **hyper)
    _run_pair(ours, theirs, p, q, 6, shape)
    torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], rtol=0, atol=0)


class _Named(nn.Module):
    """A module tree with the checkpoint names of both model families, so routing is tested by name."""

    def __init__(self, D=16, E=4, I=8, P=12, H=3):
        super().__init__()
        self.params = {}

        def add(name, *shape, fill=0.02):
            self.params[name] = nn.Parameter(torch.randn(*shape) * fill)
            self.register_parameter(name.replace(".", "__"), self.params[name])

        add("model.embed_tokens.weight", 32, D)
        add("lm_head.weight", 32, D)
        add("model.norm.weight", D)
        add("model.layers.0.input_layernorm.weight", D)
        add("model.layers.0.self_attn.q_a_proj.weight", 8, D)
        add("model.layers.0.self_attn.q_a_layernorm.weight", 8)
        add("model.layers.0.self_attn.kv_b_proj.weight", 24, 8)
        add("model.layers.0.mlp.gate.weight", E, D)
        add("model.layers.0.mlp.experts.gate_proj", E, I, D)
        add("model.layers.0.mlp.experts.down_proj", E, D, I)
        add("model.layers.0.mlp.shared_experts.up_proj.weight", I, D)
        add("model.layers.1.self_attn.q_conv1d.weight", P, 1, 4)
        add("model.layers.1.self_attn.A_log", 1, 1, H, 1)
        add("model.layers.1.self_attn.dt_bias", P)
        add("model.layers.1.self_attn.f_b_proj.weight", P, 4)
        add("model.layers.1.self_attn.o_norm.weight", 4)
        add("model.layers.1.block_sparse_moe.experts.up_proj", E, I, D)

    def named_parameters(self, *args, **kwargs):
        return iter(self.params.items())


MUON_NAMES = {
    "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight",
    "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_proj", "model.layers.0.mlp.experts.down_proj",
    "model.layers.0.mlp.shared_experts.up_proj.weight", "model.layers.1.self_attn.f_b_proj.weight",
    "model.layers.1.block_sparse_moe.experts.up_proj",
}


def test_param_groups_route_by_name_and_kind():
    model = _Named()
    groups = build_param_groups(model, optimizer="muon", lr=2e-3, weight_decay=0.1, adamw_lr=1e-3)
    kinds = {g["kind"]: g for g in groups}
    assert {n for n, _ in kinds["muon"]["params"]} == MUON_NAMES
    assert {n for n, _ in kinds["adamw"]["params"]} == set(model.params) - MUON_NAMES
    assert kinds["muon"]["lr"] == 2e-3 and kinds["adamw"]["lr"] == 1e-3
    opt = MuonAdamW(groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(model.params)
    assert opt.param_groups[0]["param_names"][0] == "model.layers.0.self_attn.q_a_proj.weight"
    only = build_param_groups(model, optimizer="adamw")
    assert len(only) == 1 and only[0]["kind"] == "adamw" and len(only[0]["params"]) == len(model.params)


def test_param_groups_cover_a_real_module_tree_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4, bias=False))
    model[0].bias.requires_grad_(False)  # frozen: no group
    groups = build_param_groups(model, optimizer="muonclip")
    names = sorted(n for g in groups for n, _ in g["params"])
    assert names == ["0.weight", "1.bias", "1.weight", "2.weight"]
    # Wrapper prefixes (DDP "module.", torch.compile "_orig_mod.") are dropped: saved state names stay portable.
    wrapped = nn.Module()
    wrapped.module = nn.Module()
    wrapped.module._orig_mod = model
    assert [[n for n, _ in g["params"]] for g in build_param_groups(wrapped)] == \
        [[n for n, _ in g["params"]] for g in groups]


def test_bad_input_is_refused_with_a_reason():
    model = _Named()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_param_groups(model, optimizer="sgd")
    with pytest.raises(ValueError, match="unknown optimizer settings"):
        build_param_groups(model, momentm=0.9)
    with pytest.raises(ValueError, match="muon scale must be one of"):
        MuonAdamW(build_param_groups(model, scale="spectral"))
    with pytest.raises(ValueError, match="cannot assign parameter 'blocks.0.kernel'"):
        param_kind("blocks.0.kernel", torch.empty(2, 3, 4, 5))
    with pytest.raises(ValueError, match="stacked experts"):
        param_kind("model.layers.0.mlp.fused.weight", torch.empty(2, 3, 4))  # 3-D but not experts
    with pytest.raises(ValueError, match="kind must be one of"):
        MuonAdamW([dict(params=[nn.Parameter(torch.ones(2, 2))], kind="sgd")])
    with pytest.raises(ValueError, match="stacked experts"):
        MuonAdamW([dict(params=[nn.Parameter(torch.ones(4))], kind="muon")])
    with pytest.raises(ValueError, match="does not use"):
        MuonAdamW([dict(params=[nn.Parameter(torch.ones(4))], kind="adamw", momentum=0.9)])
    with pytest.raises(ValueError, match="betas"):
        MuonAdamW([dict(params=[nn.Parameter(torch.ones(4))], kind="adamw", betas=(0.9, 1.0))])
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(nn.Linear(2, 2).requires_grad_(False))


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=2,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_hidden_layers=2)
TINY_CONFIGS = {
    "k2": dict(model_type="kimi_k2", n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
               topk_group=1, q_lora_rank=12),
    "kimi_linear": dict(model_type="kimi_linear", num_experts=4, num_experts_per_token=2,
                        linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "head_dim": 8, "num_heads": 2,
                                            "short_conv_kernel_size": 4}),
}


@pytest.mark.parametrize("family", TINY_CONFIGS)
def test_real_models_route_every_parameter_once_and_train(family):
    from kimi.config import ModelConfig
    from kimi.model.model import build_model

    cfg = ModelConfig.from_dict({**TINY, **TINY_CONFIGS[family]})
    model = build_model(cfg, seed=0).train()
    opt = build_optimizer(model, optimizer="muonclip", lr=1e-2)
    kinds = {n: g["kind"] for g in opt.param_groups for n in g["param_names"]}
    assert sorted(kinds) == sorted(n for n, _ in model.named_parameters())
    adamw_leaves = ("embed_tokens.weight", "lm_head.weight", "norm.weight", "layernorm.weight", "conv1d.weight",
                    "A_log", "dt_bias")
    for name, kind in kinds.items():
        assert kind == ("adamw" if name.endswith(adamw_leaves) else "muon"), name
    assert any(n.endswith("experts.gate_proj") for n, k in kinds.items() if k == "muon")
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    mla_layers = [i for i, t in enumerate(cfg.layer_types) if t == "mla"]
    assert sorted(opt.max_logits) == [f"model.layers.{i}.self_attn" for i in mla_layers]


def _toy_regression(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64, bias=False), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 16)
    y = torch.sin(x[:, :4] * 2) + x[:, 4:8] * x[:, 8:12]
    return model, x, y


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_training_reduces_loss(optimizer):
    model, x, y = _toy_regression(0)
    opt = build_optimizer(model, optimizer=optimizer, lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_state_dict_round_trip_resumes_exactly():
    def run(steps, opt, model, x, y):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model, x, y = _toy_regression(1)
    opt = build_optimizer(model, optimizer="muon", lr=1e-2)
    run(3, opt, model, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    run(3, opt, model, x, y)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # no pickled code: plain tensors, numbers and strings
    resumed, _, _ = _toy_regression(2)
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, optimizer="muon", lr=1e-2)
    opt2.load_state_dict(saved["optim"])
    run(3, opt2, resumed, x, y)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_state_from_a_different_model_is_refused_by_name():
    model, x, y = _toy_regression(1)
    opt = build_optimizer(model, optimizer="muon", lr=1e-2)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    state = opt.state_dict()

    wider = nn.Sequential(nn.Linear(16, 64, bias=False), nn.ReLU(), nn.Linear(64, 65), nn.ReLU(), nn.Linear(65, 4))
    with pytest.raises(ValueError, match="parameter '2.weight' has shape"):
        build_optimizer(wider, optimizer="muon").load_state_dict(state)
    renamed = nn.Sequential(nn.Linear(16, 64, bias=False), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    renamed.insert(0, nn.Identity())
    with pytest.raises(ValueError, match="only in the model"):
        build_optimizer(renamed, optimizer="muon").load_state_dict(state)
    with pytest.raises(ValueError, match="param groups"):
        build_optimizer(model, optimizer="adamw").load_state_dict(state)


def test_newton_schulz_runs_in_bf16_only_where_bf16_is_native(monkeypatch):
    # fp32 where bf16 matmuls would be emulated (~40% of a small model's CPU training step in bf16); the update is
    # the same polar factor either way, to bf16's rounding
    seen = []
    real = optim.newton_schulz
    monkeypatch.setattr(optim, "newton_schulz", lambda x, *a: seen.append(a[-1]) or real(x, *a))
    g = torch.randn(3, 24, 40)
    updates = {}
    for native in (True, False):
        monkeypatch.setattr(optim, "default_dtype", lambda device, n=native: torch.bfloat16 if n else torch.float32)
        p = nn.Parameter(torch.zeros(3, 24, 40))
        opt = MuonAdamW([dict(params=[p], kind="muon", lr=0.1, weight_decay=0.0)])
        p.grad = g.clone()
        opt.step()
        updates[native] = p.detach().clone()
    assert seen == [torch.bfloat16, torch.float32]
    torch.testing.assert_close(updates[False], updates[True], atol=0.02 * updates[True].abs().max().item(), rtol=0)
    explicit = MuonAdamW([dict(params=[nn.Parameter(torch.zeros(4, 4))], kind="muon")], ns_dtype=torch.bfloat16)
    explicit.param_groups[0]["params"][0].grad = torch.randn(4, 4)
    explicit.step()
    assert seen[-1] == torch.bfloat16  # an explicit dtype wins


def test_low_precision_parameters_keep_fp32_state():
    p = nn.Parameter(torch.randn(16, 24, dtype=torch.bfloat16))
    b = nn.Parameter(torch.randn(24, dtype=torch.bfloat16))
    opt = MuonAdamW([dict(params=[p], kind="muon"), dict(params=[b], kind="adamw")])
    p.grad, b.grad = torch.randn_like(p), torch.randn_like(b)
    before = p.detach().clone()
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32
    assert opt.state[b]["exp_avg_sq"].dtype == torch.float32
    assert p.dtype == torch.bfloat16 and not torch.equal(p, before)


class _Sharded(nn.Module):
    """Odd sizes, so FSDP2's dim-0 shards are uneven, and one stacked-experts parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 33, bias=False)
        self.experts = nn.Module()
        self.experts.up_proj = nn.Parameter(torch.randn(3, 7, 33) * 0.2)  # [E, out, in]
        self.out = nn.Linear(7, 5)

    def forward(self, x):
        h = torch.relu(self.proj(x))
        return self.out(torch.einsum("bd,eid->bi", h, self.experts.up_proj))


def _sharded_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 5, generator=g)


def _train_sharded(model, x, y, steps=3):
    opt = build_optimizer(model, optimizer="muon", lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _fsdp_worker(rank, world, init_file, out_file):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)  # two ranks share the CPU cores
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _Sharded()
        fully_shard(model)
        x, y = _sharded_data()
        _train_sharded(model, x.chunk(world)[rank], y.chunk(world)[rank])
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(full, out_file)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # spawned FSDP2 ranks sometimes abort at process exit (C++ thread teardown) on this CPU box
def test_fsdp2_sharded_muon_orthogonalises_the_full_matrix():
    """2 gloo ranks with FSDP2 dim-0 shards take the same steps as one process on the same global batch."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp_worker, args=(2, os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")), nprocs=2)
        sharded = torch.load(os.path.join(tmp, "out.pt"), weights_only=True)
    model = _Sharded()
    _train_sharded(model, *_sharded_data())
    for name, w in model.state_dict().items():
        # Muon matrices: bit-identical up to the gradient all-reduce's summation order; NS on a shard is off by ~1e-2.
        torch.testing.assert_close(sharded[name], w, rtol=1e-5, atol=1e-5, msg=name)
