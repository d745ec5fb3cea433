"""Weight-only quantised linears on CPU: bf16 F.linear vs block-FP8 (Fp8BlockLinear) vs INT4 W4A16 (Int4Linear).

The matrices are K2 expert shapes: gate/up 2048x7168 and down 7168x2048, with batch 1 and 16 tokens in bf16.
For each we report time per matmul, bytes of weights read per matmul, and resident bytes of the weights
(tensor storage: weights plus scales). All three run side by side, interleaved, in one process.
Correctness is checked in the same run: each fast path against its dequantise-then-F.linear twin. The
targets are INT4 <= 30% of bf16 memory and batch-1 INT4 time <= 1.5x bf16. Speed ratios are withheld when
a check fails.

    python bench/quant.py            # full expert shapes
    python bench/quant.py --quick    # 512x1792 and 1792x512, for a smoke run

The loading half (bench_loading) writes a K2-shaped bf16 checkpoint of about --load-mb MB (4 shards + index)
and loads it in fresh subprocesses, alternating, with kimi.load_model and with transformers'
DeepseekV3ForCausalLM.from_pretrained: wall time of the call and peak resident-memory growth (VmHWM after, minus
VmRSS before, with the high-water mark reset after imports). Correctness in the same run: every tensor kimi
loaded equals the file's (read back with safetensors), and both loaded models' fp32 logits on one prompt are
compared.

    python bench/quant.py --skip-matmul --load-mb 220    # loading only (--threads also sets the children's)

Prints the tables, then one JSON line last.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kimi.ops.quant import Fp8BlockLinear, Int4Linear, fp8_block_linear_reference, int4_linear_reference


def _resident_bytes(module_or_tensor) -> int:
    """Bytes of the distinct storages behind a tensor or a module's parameters and buffers."""
    if torch.is_tensor(module_or_tensor):
        tensors = [module_or_tensor]
    else:
        tensors = [*module_or_tensor.parameters(), *module_or_tensor.buffers()]
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _time_interleaved(fns: dict, repeat: int) -> dict:
    """Median ms per call. Rounds go through all fns in turn, so load from other processes hits them alike."""
    for f in fns.values():
        f(), f()
    samples = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_matmul(args) -> dict:
    shapes = [(512, 1792), (1792, 512)] if args.quick else [(2048, 7168), (7168, 2048)]
    rows, ok = [], True
    for n_out, n_in in shapes:
        w = (torch.randn(n_out, n_in) * 0.02).to(torch.bfloat16)
        fp8 = Fp8BlockLinear.from_float(w)
        int4 = Int4Linear.from_float(w)
        mem = {"bf16": _resident_bytes(w), "fp8": _resident_bytes(fp8), "int4": _resident_bytes(int4)}
        for m in (1, 16):
            x = torch.randn(m, n_in, dtype=torch.bfloat16)
            with torch.no_grad():
                y_ref = F.linear(x, w)
                err_fp8 = _rel_err(fp8(x), fp8_block_linear_reference(x, fp8.weight, fp8.weight_scale_inv))
                sd = int4.state_dict()  # checkpoint layout, also once weight_packed is in the kernel's
                twin4 = int4_linear_reference(x, sd["weight_packed"], sd["weight_scale"], sd["weight_shape"])
                y4 = int4(x)
                err_int4 = _rel_err(y4, twin4)
                q_fp8, q_int4 = _rel_err(fp8(x), y_ref), _rel_err(y4, y_ref)
                t = _time_interleaved({"bf16": lambda: F.linear(x, w), "fp8": lambda: fp8(x),
                                       "int4": lambda: int4(x)}, args.repeat)
            # bf16 rounding of the twin's weights vs the kernel's exact fp32 q*scale: a few bf16 ulps.
            check = err_fp8 <= 1e-2 and err_int4 <= 2e-2
            ok &= check
            rows.append({"shape": [n_out, n_in], "tokens": m, "check_ok": check,
                         "err_vs_twin": {"fp8": err_fp8, "int4": err_int4},
                         "quant_err_vs_bf16": {"fp8": q_fp8, "int4": q_int4},
                         "ms": t, "weight_bytes_read": mem, "resident_bytes": mem,
                         "int4_kernel": int4.kernel_layout})
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, activations bf16, median of {args.repeat}")
    print(f"{'shape':>11} {'tok':>3} | {'bf16 ms':>8} {'fp8 ms':>8} {'int4 ms':>8} | {'fp8/bf16':>8} "
          f"{'int4/bf16':>9} | {'MB bf16':>7} {'fp8':>6} {'int4':>6} | {'int4 mem':>8} | twin err fp8/int4 | ok")
    for r in rows:
        t, mb = r["ms"], {k: v / 2**20 for k, v in r["resident_bytes"].items()}
        shape = "x".join(map(str, r["shape"]))
        print(f"{shape:>11} {r['tokens']:>3} | {t['bf16']:8.3f} {t['fp8']:8.3f} {t['int4']:8.3f} | "
              f"{t['fp8'] / t['bf16']:8.2f} {t['int4'] / t['bf16']:9.2f} | {mb['bf16']:7.2f} {mb['fp8']:6.2f} "
              f"{mb['int4']:6.2f} | {mb['int4'] / mb['bf16']:7.1%} | {r['err_vs_twin']['fp8']:.1e}/"
              f"{r['err_vs_twin']['int4']:.1e} | {r['check_ok']}")
    mem_ratio = max(r["resident_bytes"]["int4"] / r["resident_bytes"]["bf16"] for r in rows)
    b1 = [r["ms"]["int4"] / r["ms"]["bf16"] for r in rows if r["tokens"] == 1]
    summary = {
        "correct": ok,
        "int4_mem_ratio_vs_bf16": mem_ratio,
        "fp8_mem_ratio_vs_bf16": max(r["resident_bytes"]["fp8"] / r["resident_bytes"]["bf16"] for r in rows),
        "int4_b1_time_ratio_vs_bf16": max(b1) if ok else None,
        "target_int4_mem_le_0.30": mem_ratio <= 0.30,
        "target_int4_b1_time_le_1.5x": (max(b1) <= 1.5) if ok else None,
        "rows": rows,
    }
    if ok:
        verdict = "faster than" if max(b1) < 1.0 else "slower than"
        print(f"INT4 memory {mem_ratio:.1%} of bf16; batch-1 INT4 matmul {max(b1):.2f}x bf16 time "
              f"({verdict} bf16)")
    else:
        print("correctness check FAILED: no speed-up reported")
    return summary


_LOADER = textwrap.dedent("""
    import json, sys, time
    import torch
    which, path, out = sys.argv[1:4]
    if which == "kimi":
        from kimi.model.loader import load_model
        load = lambda: load_model(path)
    else:
        from transformers import DeepseekV3ForCausalLM
        load = lambda: DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS, so import peaks do not count
    base = status("VmRSS:")
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    peak = status("VmHWM:") - base
    size = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    result = {"seconds": seconds, "peak_bytes": peak, "model_bytes": size}
    from safetensors.torch import load_file, save_file
    if which == "kimi":  # every loaded tensor equals the checkpoint's own bytes
        from pathlib import Path
        from kimi.model.loader import checkpoint_tensors
        stored = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            stored.update(load_file(f))
        ours = {n: make() for n, make in checkpoint_tensors(model)}
        result["tensors_equal"] = sorted(ours) == sorted(stored) and all(torch.equal(ours[n], stored[n]) for n in stored)
    model = model.cast(torch.float32) if which == "kimi" else model.float()  # compare the math, not bf16 rounding
    with torch.no_grad():
        logits = model(torch.arange(3, 35)[None])
    logits = logits if torch.is_tensor(logits) else logits.logits
    save_file({"logits": logits.float().contiguous()}, out)
    print(json.dumps(result))
""")


def _write_checkpoint(path: Path, target_mb: float) -> int:
    """A K2-shaped (deepseek_v3) bf16 checkpoint of about target_mb MB, written tensor by tensor into ~64 MB
    shards with an index. Values are windows of one random pool, so writing is quick. Returns its bytes."""
    from safetensors.torch import save_file

    from kimi.config import ModelConfig
    from kimi.model.model import Transformer

    hidden, vocab, inter = 1024, 16384, 256
    fixed = 2 * vocab * hidden + 2 * 3 * hidden * 2048  # embeddings + the dense layer, roughly
    per_expert = 3 * hidden * inter * 2 * 2  # bytes of one expert in each of the 2 MoE layers
    experts = max(8, round((target_mb * 2**20 - 2 * fixed) / per_expert))
    cfg = {"model_type": "deepseek_v3", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2048,
           "moe_intermediate_size": inter, "num_attention_heads": 8, "kv_lora_rank": 128, "q_lora_rank": 256,
           "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "num_hidden_layers": 3,
           "n_routed_experts": experts, "num_experts_per_tok": 4, "first_k_dense_replace": 1, "n_group": 1,
           "topk_group": 1, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16"}
    with torch.device("meta"):
        meta = Transformer(ModelConfig.from_dict(cfg))
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    shards, current, size, at, total = [], {}, 0, 0, 0
    for name, t in meta.state_dict().items():
        stem, _, proj = name.rpartition(".")
        parts = ({f"{stem}.{e}.{proj}.weight": t.shape[1:] for e in range(t.shape[0])}
                 if stem.endswith(".experts") else {name: t.shape})
        for n, shape in parts.items():
            numel = math.prod(shape)
            at = (at + 7919) % (pool.numel() - numel) if numel < pool.numel() else 0
            dtype = torch.float32 if n.endswith("e_score_correction_bias") else torch.bfloat16
            x = pool[at:at + numel].to(dtype).reshape(shape).clone()
            if n.endswith("norm.weight"):
                x = torch.ones_like(x)
            current[n] = x
            size += x.numel() * x.element_size()
            total += x.numel() * x.element_size()
            if size >= 64 * 2**20:
                shards.append(current)
                current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg))
    return total


def bench_loading(args) -> dict:
    """kimi.load_model vs transformers from_pretrained on the same >= 200 MB directory, in fresh processes."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        path.mkdir()
        nbytes = _write_checkpoint(path, args.load_mb)
        for f in path.iterdir():  # warm the page cache, so both loaders read from memory
            f.read_bytes()
        loaders = ["kimi", "transformers"]
        runs = {k: [] for k in loaders}
        for r in range(args.load_repeat):
            for which in loaders if r % 2 == 0 else loaders[::-1]:
                out = Path(tmp) / f"{which}.safetensors"
                env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
                proc = subprocess.run([sys.executable, "-c", _LOADER, which, str(path), str(out)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"{which} loader failed:\n{proc.stderr[-2000:]}")
                runs[which].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        a = load_file(Path(tmp) / "kimi.safetensors")["logits"]
        b = load_file(Path(tmp) / "transformers.safetensors")["logits"]
    logit_diff = (a - b).abs().max().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    summary = {}
    for which, rs in runs.items():
        summary[which] = {"seconds": statistics.median(r["seconds"] for r in rs),
                          "peak_bytes": statistics.median(r["peak_bytes"] for r in rs),
                          "model_bytes": rs[0]["model_bytes"]}
        summary[which]["peak_over_model"] = summary[which]["peak_bytes"] / summary[which]["model_bytes"]
    ok = all(r["tensors_equal"] for r in runs["kimi"])
    print(f"\nLoading a {nbytes / 2**20:.0f} MB bf16 checkpoint (4 shards + index, page cache warm), median of "
          f"{args.load_repeat} fresh processes each")
    print(f"{'loader':>12} | {'seconds':>8} | {'peak RSS MB':>11} | {'model MB':>8} | {'peak/model':>10}")
    for which, r in summary.items():
        print(f"{which:>12} | {r['seconds']:8.2f} | {r['peak_bytes'] / 2**20:11.0f} | {r['model_bytes'] / 2**20:8.0f}"
              f" | {r['peak_over_model']:10.2f}")
    print(f"kimi tensors equal the file's: {ok}; kimi vs transformers fp32 logits: max|d| {logit_diff:.3g}, "
          f"top-1 agreement {top1:.2f}")
    speedup = summary["transformers"]["seconds"] / summary["kimi"]["seconds"]
    if ok:
        print(f"kimi loads {speedup:.2f}x as fast as transformers, peak {summary['kimi']['peak_over_model']:.2f}x "
              f"its model size (target <= 1.2x)")
    else:
        print("correctness check FAILED: no loading comparison reported")
    return {"correct": ok, "checkpoint_bytes": nbytes, "logits_max_abs_diff_vs_transformers": logit_diff,
            "logits_top1_agreement_vs_transformers": top1, "kimi": summary["kimi"],
            "transformers": summary["transformers"], "kimi_speedup_vs_transformers": speedup if ok else None,
            "target_kimi_peak_le_1.2x": summary["kimi"]["peak_over_model"] <= 1.2}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small matrices (512x1792, 1792x512) for a smoke run")
    p.add_argument("--repeat", type=int, default=30, help="timed calls per path and shape (median reported)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0 keeps torch's default); 1 is steadiest on a shared machine")
    p.add_argument("--load-mb", type=float, default=220, help="size of the checkpoint the loading half writes")
    p.add_argument("--load-repeat", type=int, default=3, help="fresh-process loads per loader (median reported)")
    p.add_argument("--skip-matmul", action="store_true", help="run only the loading half")
    p.add_argument("--skip-loading", action="store_true", help="run only the matmul half")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"bench": "quant"}
    if not args.skip_matmul:
        result["matmul"] = bench_matmul(args)
    if not args.skip_loading:
        result["loading"] = bench_loading(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
