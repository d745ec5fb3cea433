"""Weight-only quantised linears on CPU: bf16 F.linear vs block-FP8 (Fp8BlockLinear) vs INT4 W4A16 (Int4Linear).

The matrices are K2 expert shapes: gate/up 2048x7168 and down 7168x2048, with batch 1 and 16 tokens in bf16.
For each we report time per matmul, bytes of weights read per matmul, and resident bytes of the weights
(tensor storage: weights plus scales). All three run side by side, interleaved, in one process.
Correctness is checked in the same run: each fast path against its dequantise-then-F.linear twin. The
targets are INT4 <= 30% of bf16 memory and batch-1 INT4 time <= 1.5x bf16. Speed ratios are withheld when
a check fails.

    python bench/quant.py            # full expert shapes
    python bench/quant.py --quick    # 512x1792 and 1792x512, for a smoke run

Prints a table, then one JSON line last. The checkpoint-loading comparison goes beside bench_matmul as a
separate function.
"""

import argparse
import json
import platform
import statistics
import time

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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small matrices (512x1792, 1792x512) for a smoke run")
    p.add_argument("--repeat", type=int, default=30, help="timed calls per path and shape (median reported)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0 keeps torch's default); 1 is steadiest on a shared machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"bench": "quant", "matmul": bench_matmul(args)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
