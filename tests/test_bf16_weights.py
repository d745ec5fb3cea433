"""fp32 models streaming bf16 copies of their bf16-exact weights (kimi/ops/bf16_weights.py, the AVX2 gemv of
kimi/ops/cpu_kernels_fp32.c) against their plain twins: the fp32 product up to summation order, the same greedy
tokens through the model and the engine (which adds the copies to an fp32 model it loads from a bf16 checkpoint),
and weights that are not bf16-exact left alone. Skipped where the gemv cannot run (no AVX2 + FMA, no C compiler)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from kimi.engine.engine import LLM
from kimi.engine.sampling_params import SamplingParams
from kimi.model.generate import generate
from kimi.model.loader import load_model, save_model
from kimi.model.model import build_model
from kimi.ops import bf16_weights, cpu_kernels
from kimi.ops.bf16_weights import Bf16CopyExperts, Bf16CopyLinear, Bf16CopyMoE, has_copies
from kimi.ops.packed_linear import OneRowMLA, OneRowMLP, OneRowRMSNorm, OneRowRouter, pack_for_cpu
from tests.test_model import k2_tiny, kl_tiny
from tests.threads import torch_threads

pytestmark = pytest.mark.skipif(not cpu_kernels.fp32_available(),
                                reason="kimi's fp32 gemv needs AVX2 + FMA and a C compiler")
FAMILIES = {"k2": k2_tiny, "kimi_linear": kl_tiny}


@pytest.mark.parametrize("rows", [1, 3, 13, 30])  # streamed row by row up to 12 rows; more go through the tiles
@pytest.mark.parametrize("n,k", [(1, 1), (37, 5), (64, 16), (300, 100), (1001, 37), (257, 768)])
def test_gemv_fp32_is_the_fp32_product(rows, n, k):
    g = torch.Generator().manual_seed(n * k + rows)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g).bfloat16()
    y = cpu_kernels.gemv_fp32(x, w)
    ref = (x.double() @ w.double().T)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    # fp32 summation-order error only, on the scale of sum |x| |w| (no rounding of the result to bf16)
    assert ((y.double() - ref).abs() <= 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-30).all()


def test_gemv_fp32_is_the_same_on_any_number_of_threads_and_rejects_what_it_cannot_compute():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 768, generator=g).bfloat16()
    # six rows stream W row by row; forty go through the tiles, W split in blocks among the threads: the same sums
    for x in (torch.randn(2, 3, 768, generator=g), torch.randn(40, 768, generator=g)):
        one = cpu_kernels.gemv_fp32(x, w)
        with torch_threads(2):
            two = cpu_kernels.gemv_fp32(x, w)
        assert one.shape == (*x.shape[:-1], 1024) and torch.equal(one, two)
    with pytest.raises(ValueError, match="fp32"):
        cpu_kernels.gemv_fp32(x.bfloat16(), w)
    with pytest.raises(ValueError, match="contiguous bf16"):
        cpu_kernels.gemv_fp32(x, w.float())
    with pytest.raises(ValueError, match=r"\[\.\.\., K\]"):
        cpu_kernels.gemv_fp32(x[..., :700], w)


def test_only_bf16_exact_weights_get_copies():
    assert bf16_weights.bf16_exact(torch.randn(8, 8).bfloat16().float())
    assert not bf16_weights.bf16_exact(torch.randn(8, 8))
    model = build_model(k2_tiny(), dtype=torch.float32, seed=1)  # fp32 initialisation: not bf16 numbers
    pack_for_cpu(model)  # the norms, router and MLA's projection tail still get their one-row twins
    assert not has_copies(model) and not any(isinstance(m, OneRowMLP) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_copies_give_the_fp32_logits_and_greedy_tokens(family):
    plain = build_model(FAMILIES[family](), dtype=torch.bfloat16, seed=3).float().eval()
    copied = build_model(FAMILIES[family](), dtype=torch.bfloat16, seed=3).float().eval()
    assert pack_for_cpu(copied) > 0
    kinds = {type(m) for m in copied.modules()}
    assert {Bf16CopyLinear, Bf16CopyExperts, Bf16CopyMoE, OneRowMLP, OneRowMLA, OneRowRMSNorm, OneRowRouter} <= kinds
    for name, m in copied.named_modules():  # MLA's absorbed decode reads kv_b_proj's copy and its weight
        if name.endswith("kv_b_proj"):
            assert type(m) is Bf16CopyLinear and m.weight.dtype == torch.float32
    assert plain.state_dict().keys() == copied.state_dict().keys()
    with torch.inference_mode():
        # up to FEW_ROWS rows go through the copies (one row: one C call per block); more: F.linear
        for T in (1, 4, 9, bf16_weights.FEW_ROWS, bf16_weights.FEW_ROWS + 1):
            ids = torch.randint(0, plain.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
            want, got = plain(ids), copied(ids)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert generate(plain, [5, 9, 2, 7], 16)[0] == generate(copied, [5, 9, 2, 7], 16)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_adds_copies_to_an_fp32_model_of_a_bf16_checkpoint(family, tmp_path):
    save_model(build_model(FAMILIES[family](), dtype=torch.bfloat16, seed=4), tmp_path)
    llm = LLM(tmp_path, dtype=torch.float32, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128,
              block_size=8)
    assert has_copies(llm.model)
    reference = load_model(tmp_path, dtype=torch.float32).eval()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3, 3, 9, 8, 8, 7]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == generate(reference, p, 10)[0]
    save_model(llm.model, tmp_path / "again")  # the weights are still the model's own: it saves as it loaded
    again = load_model(tmp_path / "again", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), again.state_dict().values()))
    assert not has_copies(LLM(tmp_path, dtype=torch.float32, max_model_len=128, pack_weights=False).model)


def test_without_the_gemv_the_engine_keeps_plain_fp32_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "fp32_available", lambda: False)
    save_model(build_model(k2_tiny(), dtype=torch.bfloat16, seed=6), tmp_path)
    llm = LLM(tmp_path, dtype=torch.float32, max_model_len=64, block_size=8)
    assert not has_copies(llm.model)
    reference = load_model(tmp_path, dtype=torch.float32).eval()
    out = llm.generate([[4, 8, 15, 16, 23, 42]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == generate(reference, [4, 8, 15, 16, 23, 42], 6)[0]


def test_without_a_compiler_or_when_turned_off_there_are_no_copies(tmp_path):
    import os
    import subprocess
    import sys

    probe = ("import torch; from kimi.ops import cpu_kernels, packed_linear; "
             "print(cpu_kernels.fp32_available(), packed_linear.supported(torch.device('cpu'), torch.float32))")
    for env in ({"KIMI_CPU_KERNELS": "0"}, {"CC": "false", "KIMI_CACHE_DIR": str(tmp_path)}):  # `false` fails the build
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == "False False", (env, out.stderr)


@pytest.mark.parametrize("heads,rank", [(8, 256), (11, 37)])  # register blocks only; leftover heads and columns
def test_mla_decode_fp32_equals_the_torch_path(heads, rank, monkeypatch):
    from kimi.model.mla import MLA
    from kimi.ops import attention

    cfg = k2_tiny(num_attention_heads=heads, kv_lora_rank=rank)
    mla = MLA(cfg, 0)
    torch.nn.init.normal_(mla.kv_b_proj.weight, std=0.05)
    mla.kv_b_proj.weight.data = mla.kv_b_proj.weight.data.bfloat16().float()
    mla.kv_b_proj = Bf16CopyLinear(mla.kv_b_proj)
    g = torch.Generator().manual_seed(heads)
    W = rank + mla.qk_rope_head_dim
    cache = torch.randn(3000, W, generator=g)
    # contexts of one chunk, and of several (the kernel splits them every 512 rows and merges the chunks)
    for B, rows, mask in [(1, slice(7, 207), torch.ones(1, 200, dtype=torch.bool)),
                          (3, torch.randint(0, 300, (3, 50), generator=g), torch.arange(50)[None] < torch.tensor(
                              [[50], [1], [29]])),
                          (1, slice(100, 2900), torch.ones(1, 2800, dtype=torch.bool)),
                          (3, torch.randint(0, 3000, (3, 1300), generator=g), torch.arange(1300)[None] < torch.tensor(
                              [[1300], [512], [513]]))]:
        q_nope = torch.randn(B, 1, heads, mla.qk_nope_head_dim, generator=g)
        q_pe = torch.randn(B, 1, heads, mla.qk_rope_head_dim, generator=g)
        got = attention.paged_decode(mla, q_nope, q_pe, cache, rows, mask)
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "fp32_available", lambda: False)
            want = attention.paged_decode(mla, q_nope, q_pe, cache, rows, mask)
        assert got.shape == want.shape == (B, 1, heads, mla.v_head_dim)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_mla_decode_fp32_splits_contexts_the_same_way_whatever_the_batch_and_threads():
    """A long context is attended in fixed chunks: one sequence's output is bit for bit the same alone or in a
    batch, with one thread or two (seeded sampling must not depend on who else is in the batch)."""
    from kimi.model.mla import MLA

    mla = MLA(k2_tiny(), 0)
    mla.kv_b_proj.weight.data = mla.kv_b_proj.weight.data.bfloat16().float()
    mla.kv_b_proj = Bf16CopyLinear(mla.kv_b_proj)
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(4000, mla.kv_lora_rank + mla.qk_rope_head_dim, generator=g)
    rows = torch.randperm(4000, generator=g)[:3 * 1200].view(3, 1200)
    lengths = torch.tensor([1200, 700, 1100])
    q_nope = torch.randn(3, 1, mla.num_heads, mla.qk_nope_head_dim, generator=g)
    q_pe = torch.randn(3, 1, mla.num_heads, mla.qk_rope_head_dim, generator=g)
    batch = cpu_kernels.mla_decode_fp32(mla, q_nope, q_pe, cache, rows, lengths)
    with torch_threads(1):
        for b in range(3):
            alone = cpu_kernels.mla_decode_fp32(mla, q_nope[b:b + 1], q_pe[b:b + 1], cache, rows[b:b + 1],
                                                lengths[b:b + 1])
            assert torch.equal(alone, batch[b:b + 1])


def test_swiglu_fp32_equals_the_torch_expert():
    g = torch.Generator().manual_seed(0)
    D, I = 96, 40
    x = torch.randn(1, D, generator=g)
    gate, up, down = (torch.randn(*s, generator=g).bfloat16() for s in ((I, D), (I, D), (D, I)))
    want = F.linear(F.silu(F.linear(x, gate.float())) * F.linear(x, up.float()), down.float())
    got = cpu_kernels.swiglu_fp32(x, torch.cat([gate, up]), down)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    total = torch.ones(1, D)
    assert cpu_kernels.swiglu_fp32(x, torch.cat([gate, up]), down, 0.25, total) is None
    assert (total - (1 + 0.25 * want)).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(ValueError, match="gate_up"):
        cpu_kernels.swiglu_fp32(x, gate, down)


@pytest.mark.parametrize("config", [k2_tiny, kl_tiny, lambda: k2_tiny(n_shared_experts=0)],
                         ids=["k2", "kimi_linear", "k2_without_shared_experts"])
def test_one_token_blocks_equal_their_torch_twins(config):
    """For one fp32 token each block is one C call after pack_for_cpu: RMSNorm, routing, all of MLA.project (the
    stacked products, K2's q norm and q_b_proj, the latent's norm and the rotations) and a whole MoE block (routing,
    the chosen experts, the shared experts). Each equals its plain module up to fp32 summation order, and routes to
    the same experts."""
    plain = build_model(config(), dtype=torch.bfloat16, seed=7).float().eval()
    fast = copy.deepcopy(plain)
    pack_for_cpu(fast)
    twins = dict(fast.named_modules())
    g = torch.Generator().manual_seed(1)
    positions = torch.tensor([[11]])
    seen = set()

    def close(got, want):
        assert got.shape == want.shape and (got - want).abs().max() <= 2e-6 * want.abs().max()

    with torch.inference_mode():
        for name, module in plain.named_modules():
            twin = twins[name]
            x = 3 * torch.randn(1, 1, plain.config.hidden_size, generator=g)
            if type(module).__name__ == "RMSNorm" and module.weight.shape[0] == x.shape[-1]:
                close(twin(x), module(x))
            elif type(module).__name__ == "Router":
                (i_got, w_got), (i_want, w_want) = twin(x[0]), module(x[0])
                assert torch.equal(i_got, i_want)
                close(w_got, w_want)
            elif type(module).__name__ == "MLA":
                for got, want in zip(twin.project(x, positions), module.project(x, positions)):
                    close(got, want)
            elif type(module).__name__ == "MoE":
                close(twin(x), module(x))
            else:
                continue
            seen.add(type(twin))
    assert {OneRowRMSNorm, OneRowRouter, OneRowMLA, Bf16CopyMoE} <= seen
    bad = torch.randn(1, 7)
    with pytest.raises(ValueError, match="one fp32 token"):
        cpu_kernels.moe_one_fp32(next(m for m in fast.modules() if isinstance(m, Bf16CopyMoE)), bad)
    with pytest.raises(ValueError, match="one fp32 token"):
        cpu_kernels.mla_project_x_fp32(*next((m, m.in_plain) for m in fast.modules() if isinstance(m, OneRowMLA)),
                                       bad, None, None)
    with pytest.raises(ValueError, match="both bf16 or both fp32"):
        cpu_kernels.rms_norm(bad, torch.ones(7, dtype=torch.bfloat16), 1e-6)


@pytest.mark.parametrize("head_dim,B", [(16, 1), (16, 3), (20, 3)])  # 20: the kernel's 8-lane tail
def test_kda_decode_fp32_equals_the_torch_layer(head_dim, B):
    """An fp32 KDA layer's single-token step as one C call on the pools in place (cpu_kernels.kda_decode on the fp32
    kernels; its projections stacked into one gemv over their bf16 copies) against the torch layer, three steps."""
    from kimi.ops.packed_linear import OneRowKDA
    from tests.test_cpu_kernels import PoolCache

    lac = {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": head_dim, "num_heads": 4,
           "short_conv_kernel_size": 4}
    model = build_model(kl_tiny(linear_attn_config=lac), dtype=torch.bfloat16, seed=5).float()
    fast_model = copy.deepcopy(model)
    pack_for_cpu(fast_model)
    layer, fast = model.model.layers[0].self_attn, fast_model.model.layers[0].self_attn
    assert type(fast) is OneRowKDA and fast.in_plain is not None
    g = torch.Generator().manual_seed(head_dim + B)
    P = 4 * head_dim
    windows = torch.randn(6, 3 * P, 3, generator=g)
    states = torch.randn(6, 4, head_dim, head_dim, generator=g) * 0.3
    rows = torch.tensor([4, 0, 2][:B])
    x = torch.randn(B, 1, layer.q_proj.in_features, generator=g)
    caches = [PoolCache(windows.clone(), states.clone(), rows) for _ in range(2)]
    with torch.inference_mode():
        for _ in range(3):  # three steps: the windows slide, the states carry
            want = layer(x, cache=caches[0])
            got = fast(x, cache=caches[1])
            assert got.shape == want.shape == (B, 1, layer.q_proj.in_features)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
            x = want
    for got, want in ((caches[1].windows, caches[0].windows), (caches[1].states, caches[0].states)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # slid and updated in place (the inputs of the
    untouched = [r for r in range(6) if r not in rows.tolist()]  # conv come from the products, in another order)
    assert torch.equal(caches[1].windows[untouched], windows[untouched])
    assert torch.equal(caches[1].states[untouched], states[untouched])
    with torch.inference_mode(), pytest.raises(ValueError, match="outside"):
        fast(x, cache=PoolCache(windows.clone(), states.clone(), torch.tensor([6, 0, 1][:B])))
