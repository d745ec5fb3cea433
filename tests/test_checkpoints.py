"""Real checkpoint formats (reference k2.md §5, §1.1-1.2; kda.md §5): tiny directories written here by hand in the
exact layouts of Kimi-K2-Instruct (block FP8), Kimi-K2-Thinking (INT4 routed experts) and bf16, loaded in both
"keep" and "dequantize" modes; save_model / `kimi convert` round trips; peak memory while loading."""

import argparse
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import kimi
from kimi.convert import add_convert_arguments, convert_main
from kimi.model.model import build_model
from kimi.model.moe import Experts
from kimi.model.quantize import Fp8Experts, Int4Experts, dequantize_model, quantize_model
from kimi.ops.quant import (Fp8BlockLinear, _cpu_kernel_block_n, dequantize_fp8_block, dequantize_int4,
                            quantize_fp8_block, quantize_int4)
from tests.test_model import FAMILIES

K2_INSTRUCT_QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
K2_THINKING_QC = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}
EXPERT_KEYS = {"k2": ("gate_proj", "up_proj", "down_proj"), "kimi_linear": ("w1", "w3", "w2")}
NOT_LINEAR = ("embed_tokens", "norm", "layernorm", "lm_head", ".gate.", "conv1d", "A_log", "dt_bias")


def tiny(family, **kw):
    return FAMILIES[family](initializer_range=0.02, **kw)  # the real init scale: outputs are not chaotic


def bf16_state(model):
    """The bf16 checkpoint of a model, written by hand: per-expert tensors under the family's names."""
    ckpt_proj = dict(zip(("gate_proj", "up_proj", "down_proj"),
                         EXPERT_KEYS["kimi_linear" if model.config.model_type == "kimi_linear" else "k2"]))
    out = {}
    for name, t in model.state_dict().items():
        stem, _, proj = name.rpartition(".")
        if stem.endswith(".experts"):
            for e in range(t.shape[0]):
                out[f"{stem}.{e}.{ckpt_proj[proj]}.weight"] = t[e].clone()
        else:
            out[name] = t.contiguous()
    return out


def is_linear_weight(name):
    return name.endswith(".weight") and not any(s in name for s in NOT_LINEAR)


def write_k2_instruct(model, path):
    """K2-Instruct layout: every Linear weight float8_e4m3fn + fp32 weight_scale_inv [ceil(out/128), ceil(in/128)]."""
    state = {}
    for name, t in bf16_state(model).items():
        if is_linear_weight(name):
            q, s = quantize_fp8_block(t)
            state[name], state[name + "_scale_inv"] = q, s
        else:
            state[name] = t
    _write(model, path, state, K2_INSTRUCT_QC)
    return state


def write_k2_thinking(model, path):
    """K2-Thinking layout: routed experts as weight_packed int32 [out, in/8], weight_scale bf16 [out, in/32],
    weight_shape [2]; everything else bf16."""
    state = {}
    for name, t in bf16_state(model).items():
        if ".experts." in name and ".shared_experts." not in name:
            stem = name.removesuffix(".weight")
            p, s = quantize_int4(t)
            state[stem + ".weight_packed"], state[stem + ".weight_scale"] = p, s
            state[stem + ".weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int32)
        else:
            state[name] = t
    _write(model, path, state, K2_THINKING_QC)
    return state


def _write(model, path, state, qc):
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**model.config.to_hf_dict(), "quantization_config": qc}))


def dense_from(state, name):
    """The dequantised fp32 weight of checkpoint module `name` in a hand-written state."""
    if name + ".weight_scale_inv" in state:
        return dequantize_fp8_block(state[name + ".weight"], state[name + ".weight_scale_inv"], torch.float32)
    if name + ".weight_packed" in state:
        return dequantize_int4(state[name + ".weight_packed"], state[name + ".weight_scale"],
                               state[name + ".weight_shape"], torch.float32)
    return state[name + ".weight"].float()


def loaded_weight(model, ckpt_module):
    """The dense weight kimi holds for a checkpoint module name (experts: a slice of the stack)."""
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    stem, e, proj = ckpt_module.rsplit(".", 2)
    if stem.endswith(".experts") and e.isdigit():
        return getattr(model.get_submodule(stem), names.get(proj, proj))[int(e)]
    return model.get_submodule(ckpt_module).weight


WRITERS = {"fp8": write_k2_instruct, "int4": write_k2_thinking}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", WRITERS)
def test_real_layout_loads_exactly_in_both_modes(family, fmt, tmp_path):
    model = build_model(tiny(family), dtype=torch.bfloat16)
    state = WRITERS[fmt](model, tmp_path)
    deq = kimi.load_model(tmp_path, dtype=torch.float32, quantized="dequantize")
    keep = kimi.load_model(tmp_path, dtype=torch.float32, quantized="keep")
    assert not any(isinstance(m, (Fp8BlockLinear, Fp8Experts, Int4Experts)) for m in deq.modules())
    kinds = {type(m) for m in keep.modules()}
    assert (Fp8Experts in kinds and Fp8BlockLinear in kinds) if fmt == "fp8" else (Int4Experts in kinds)
    if fmt == "int4":  # only the routed experts are INT4; everything else in K2-Thinking is bf16
        assert not any(isinstance(m, Fp8BlockLinear) for m in keep.modules())
    for m in keep.modules():  # MLA's absorbed path reads kv_b_proj as a matrix: held dense
        if hasattr(m, "kv_b_proj"):
            assert type(m.kv_b_proj) is torch.nn.Linear and m.kv_b_proj.weight.dtype == torch.float32
    modules = {n.removesuffix(".weight").removesuffix(".weight_packed") for n in state
               if n.endswith((".weight", ".weight_packed")) and is_linear_weight(n.replace("_packed", ""))}
    for name in sorted(modules):
        assert torch.equal(loaded_weight(deq, name), dense_from(state, name)), name
    ids = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = keep(ids), deq(ids)
    # same math, different execution: FP8 tiles dequantise bit-identically; INT4's kernel sums q*scale in fp32
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * a.abs().max().item(), err


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["fp8-block", "int4-experts"])
def test_save_writes_the_real_layout(family, fmt, tmp_path):
    """save_model's tensor names, dtypes, shapes and quantization_config equal the hand-written real layout's, and
    a bf16 -> fmt -> load round trip reproduces the dequantised weights exactly."""
    model = build_model(tiny(family), dtype=torch.bfloat16)
    want = WRITERS[fmt.split("-")[0]](model, tmp_path / "real")
    kimi.save_model(model, tmp_path / "ours", format=fmt)
    got = load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        assert (got[name].dtype, got[name].shape) == (want[name].dtype, want[name].shape), name
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name  # the same bytes
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["quantization_config"] == (K2_INSTRUCT_QC if fmt == "fp8-block" else K2_THINKING_QC)
    assert cfg["torch_dtype"] == "bfloat16"
    back = kimi.load_model(tmp_path / "ours", dtype=torch.float32, quantized="dequantize")
    for name, t in bf16_state(model).items():
        if is_linear_weight(name):
            stem = name.removesuffix(".weight")
            quantised = stem + (".weight_scale_inv" if fmt == "fp8-block" else ".weight_packed") in want
            expect = dense_from(want, stem) if quantised else t.float()
            assert torch.equal(loaded_weight(back, stem), expect), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["fp8-block", "int4-experts"])
def test_quantised_logits_stay_close_to_bf16(family, fmt, tmp_path):
    model = build_model(tiny(family), dtype=torch.bfloat16)
    kimi.save_model(model, tmp_path / "bf16")
    kimi.save_model(model, tmp_path / fmt, format=fmt)
    ref = kimi.load_model(tmp_path / "bf16", dtype=torch.float32)
    quant = kimi.load_model(tmp_path / fmt, dtype=torch.float32)
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids), quant(ids)
    max_abs = (got - want).abs().max().item()
    rel = ((got - want).norm() / want.norm()).item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{family} {fmt}: max|dlogit| {max_abs:.3f} (max|logit| {want.abs().max():.3f}), rel rms {rel:.3f}, "
          f"top-1 agreement {top1:.3f}")
    assert rel <= 0.1 and top1 >= 0.85


def test_keep_mode_memory_and_resave_is_byte_identical(tmp_path):
    model = build_model(tiny("k2"), dtype=torch.bfloat16)
    state = write_k2_thinking(model, tmp_path / "src")
    keep = kimi.load_model(tmp_path / "src")
    experts = keep.model.layers[1].mlp.experts
    dense = 2 * 3 * experts.num_experts * experts.hidden * experts.intermediate
    held = sum(t.untyped_storage().nbytes() for t in experts.buffers())
    assert held <= 0.3 * dense  # about 0.56 byte per weight against bf16's 2
    with torch.no_grad():
        keep(torch.randint(0, 96, (1, 40)))  # the CPU kernel may rewrite the packed bytes in place
    kimi.save_model(keep, tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(again) == sorted(state)
    assert all(torch.equal(again[n], state[n]) for n in state)


@pytest.mark.skipif(_cpu_kernel_block_n() is None, reason="torch has no usable CPU int4 kernel here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_experts_kernel_path_matches_dense_twin(dtype):
    bn = _cpu_kernel_block_n()
    dense = Experts(3, 2 * bn, bn)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.05)
    twin = Experts(3, 2 * bn, bn)
    quant = quantize_model(torch.nn.Sequential(dense), "int4-experts")[0]
    assert isinstance(quant, Int4Experts)
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(twin, proj).copy_(quant.dense(proj, torch.float32))
        x = torch.randn(5, 2 * bn)
        for e in range(3):
            want = F.linear(F.silu(F.linear(x, twin.gate_proj[e])) * F.linear(x, twin.up_proj[e]), twin.down_proj[e])
            got = quant.expert(e, x.to(dtype)).float()
            assert all(quant.kernel_layout(p) for p in ("gate_proj", "up_proj", "down_proj"))
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            assert (got - want).abs().max() <= tol * want.abs().max()
    back = dequantize_model(torch.nn.Sequential(quant), torch.float32)[0]
    assert type(back) is Experts and torch.equal(back.down_proj, twin.down_proj)


def read_sharded(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(path / f))
    assert sorted(out) == sorted(index["weight_map"])
    return out


def _sidecar(path):
    (path / "tiktoken.model").write_text("IQ== 0\n")
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / "generation_config.json").write_text('{"eos_token_id": 163586, "max_length": 131072}')


def test_convert_cli_round_trips_formats_and_copies_tokenizer(tmp_path, capsys):
    model = build_model(tiny("k2"), dtype=torch.bfloat16)
    state = write_k2_instruct(model, tmp_path / "fp8")
    _sidecar(tmp_path / "fp8")
    p = argparse.ArgumentParser()
    add_convert_arguments(p)
    for src, dst, to in [("fp8", "int4", "int4-experts"), ("int4", "bf16", "bf16"), ("fp8", "fp8b", "fp8-block")]:
        convert_main(p.parse_args([str(tmp_path / src), str(tmp_path / dst), "--to", to, "--max-shard-size", "0.00005"]))
        assert "tensors" in capsys.readouterr().err  # the progress bar
        for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            assert (tmp_path / dst / f).read_text() == (tmp_path / "fp8" / f).read_text()
        index = json.loads((tmp_path / dst / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        kimi.load_model(tmp_path / dst)
    again = read_sharded(tmp_path / "fp8b")
    assert sorted(again) == sorted(state) and all(torch.equal(again[n], state[n]) for n in state)  # fp8 -> fp8: as is
    bf16 = read_sharded(tmp_path / "bf16")
    assert sorted(bf16) == sorted(bf16_state(model)) and all(t.dtype in (torch.bfloat16, torch.float32) for t in bf16.values())
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    with pytest.raises(SystemExit):
        p.parse_args([str(tmp_path / "fp8"), str(tmp_path / "x"), "--to", "int8"])


def test_quantised_tensors_may_sit_in_other_shards_than_their_weights(tmp_path):
    model = build_model(tiny("kimi_linear"), dtype=torch.bfloat16)
    state = write_k2_instruct(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}  # every weight apart from its scale
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, tmp_path / file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    loaded = kimi.load_model(tmp_path, dtype=torch.float32, quantized="dequantize")
    w = "model.layers.1.block_sparse_moe.experts.5.w2"
    assert torch.equal(loaded_weight(loaded, w), dense_from(state, w))


PEAK = textwrap.dedent("""
    import json, sys, time
    import torch
    from kimi.model.loader import load_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS:")
    t0 = time.perf_counter()
    model = load_model(sys.argv[1])
    seconds = time.perf_counter() - t0
    peak = status("VmHWM:") - base
    size = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"peak": peak, "size": size, "seconds": seconds}))
""")


def write_big_checkpoint(path, shard_bytes=64 * 2**20):
    """A ~220 MB bf16 K2-shaped checkpoint in 4 shards, written tensor by tensor (no full model in memory)."""
    from kimi.config import ModelConfig
    from kimi.model.model import Transformer

    cfg = ModelConfig.from_dict({
        "model_type": "deepseek_v3", "vocab_size": 16384, "hidden_size": 1024, "intermediate_size": 2048,
        "moe_intermediate_size": 256, "num_attention_heads": 8, "kv_lora_rank": 128, "q_lora_rank": 256,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "num_hidden_layers": 3,
        "n_routed_experts": 40, "num_experts_per_tok": 4, "first_k_dense_replace": 1, "n_group": 1,
        "topk_group": 1})
    with torch.device("meta"):
        meta = Transformer(cfg)
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    shards, current, size, at = [], {}, 0, 0
    for name, t in meta.state_dict().items():
        stem, _, proj = name.rpartition(".")
        parts = ({f"{stem}.{e}.{proj}.weight": t.shape[1:] for e in range(t.shape[0])}
                 if stem.endswith(".experts") else {name: t.shape})
        for n, shape in parts.items():
            dtype = torch.float32 if n.endswith("e_score_correction_bias") else torch.bfloat16
            numel = math.prod(shape)  # windows of one random pool: writing stays fast
            at = (at + 7919) % (pool.numel() - numel) if numel < pool.numel() else 0
            current[n] = pool[at:at + numel].to(dtype).reshape(shape).clone()
            size += current[n].numel() * current[n].element_size()
            if size >= shard_bytes:
                shards.append(current)
                current, size = {}, 0
    shards.append(current)
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file)
        weight_map.update(dict.fromkeys(shard, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_peak_memory_while_loading_is_at_most_1_2x_the_model(tmp_path):
    path = write_big_checkpoint(tmp_path / "big")
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"loaded {r['size'] / 2**20:.0f} MB in {r['seconds']:.2f}s, peak RSS growth {r['peak'] / 2**20:.0f} MB "
          f"= {r['peak'] / r['size']:.3f}x")
    assert r["size"] >= 200 * 2**20
    assert r["peak"] <= 1.2 * r["size"]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", WRITERS)
def test_keep_mode_on_gpu_matches_cpu_dequantised(fmt, tmp_path):
    model = build_model(tiny("k2"), dtype=torch.bfloat16)
    WRITERS[fmt](model, tmp_path)
    gpu = kimi.load_model(tmp_path, dtype=torch.float32, device="cuda")
    cpu = kimi.load_model(tmp_path, dtype=torch.float32, quantized="dequantize")
    assert any(isinstance(m, (Fp8Experts, Int4Experts)) for m in gpu.modules())
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = gpu(ids.cuda()).cpu(), cpu(ids)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


@pytest.mark.parametrize("fmt", ["fp8-block", "int4-experts"])
def test_cast_leaves_quantised_modules_alone(fmt):
    model = quantize_model(build_model(FAMILIES["k2"](), dtype=torch.float32), fmt)
    before = {n: t.dtype for n, t in model.state_dict().items()}
    model.cast(torch.bfloat16)
    after = {n: t.dtype for n, t in model.state_dict().items()}
    quantised = [n for n in before if n.endswith(("_scale_inv", "_packed", "_scale"))]
    assert quantised and all(after[n] == before[n] for n in quantised)
    assert after["model.layers.0.self_attn.q_a_layernorm.weight"] == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 96, (1, 9))).float()).all()


def test_engine_runs_fp8_checkpoints_kept_or_dequantised(tmp_path):
    from kimi.engine.engine import LLM
    from kimi.engine.sampling_params import SamplingParams

    kimi.save_model(build_model(FAMILIES["kimi_linear"](), dtype=torch.float32), tmp_path, format="fp8-block")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = [LLM(tmp_path, dtype="float32", quantized=mode, max_model_len=64, max_num_seqs=2)
            .generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids for mode in ("keep", "dequantize")]
    assert outs[0] == outs[1] and len(outs[0]) == 6
