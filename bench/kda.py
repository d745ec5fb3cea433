"""One KDA layer's core on CPU: kimi's chunked and recurrent ops vs transformers' torch reference functions.

Shape: Kimi Linear's heads, B = 1, H = 32, K = V = 128; T = 1k, 4k, 16k; fp32 and bf16 inputs (g, the state and
all internal math stay fp32). Gates follow Kimi Linear's init: g = -exp(A_log) softplus(z + dt_bias). transformers'
chunk function materialises [H, T/64, 64, 64, K] fp32 tensors (~3.2 GB per 1k tokens at this shape), so its
cell is skipped where the estimate exceeds the memory available; the 16k cell always is.

Time: wall clock of one call, best of --repeats interleaved rounds (one round at 16k; transformers' chunk
function runs once). Peak memory: the rise in
the process's peak resident set size (VmHWM) during the call, after returning freed heap to the OS (malloc_trim)
and resetting the mark (/proc/self/clear_refs); Linux only.

Correctness in the same run: every output is compared (RMS-relative error) with transformers' recurrent function
in fp32 at the same T, and our ops with the float64 naive twin on a small case. Targets at T = 4k: ours >= 3x faster than transformers' chunk path and >= 1.5x than its recurrent
path, peak memory <= 1/4 of its chunk path. Ratios are withheld when a check fails.

    python bench/kda.py            # T = 1k, 4k, 16k
    python bench/kda.py --quick    # T = 512 and 1k only
Prints a table, then one JSON line last.
"""

import argparse
import ctypes
import json
import logging
import os
import platform
import re
import time

import torch
import torch.nn.functional as F

from kimi.ops.kda import chunk_kda, recurrent_kda
from kimi.ops.kda_naive import naive_kda

H, D = 32, 128


def _status(field: str) -> int:
    """A VmXXX field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _available() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024


def measure(fn):
    """(seconds, peak bytes above the resident set at the start, result) of one call of fn()."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, _status("VmHWM") - base, out


def inputs(T: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, z = (torch.randn(1, T, H, D, generator=gen) for _ in range(4))
    A_log = torch.log(torch.empty(H).uniform_(1, 16, generator=gen))
    dt = torch.exp(torch.empty(H * D).uniform_(-6.9, -2.3, generator=gen)).clamp_min(1e-4)
    dt_bias = (dt + torch.log(-torch.expm1(-dt))).view(H, D)
    g = -A_log.exp()[:, None] * F.softplus(z + dt_bias)                  # [1, T, H, D] fp32, <= 0
    beta = torch.rand(1, T, H, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype)


def rms_ratio(got, ref) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 512 and 1k only, for a smoke run")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved timed rounds per cell up to T = 4k (best is kept); one at 16k")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 gives steadier ratios on a shared machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.models.kimi_linear.modeling_kimi_linear import (
        chunk_kimi_delta_attention as hf_chunk, recurrent_kimi_delta_attention as hf_recurrent)

    # oracle check: our two forms against Eq. 1 in float64 on a small case with a state
    xs = [x[:, :, :2, :16] if x.dim() == 4 else x[:, :, :2] for x in inputs(200, torch.float32, seed=1)]
    h0 = torch.randn(1, 2, 16, 16)
    ref = naive_kda(*xs, initial_state=h0, use_qk_l2norm_in_kernel=True)[0]
    oracle = {name: rms_ratio(op(*xs, initial_state=h0, use_qk_l2norm_in_kernel=True)[0], ref)
              for name, op in [("kimi chunk", chunk_kda), ("kimi recurrent", recurrent_kda)]}
    ok = all(e < 1e-5 for e in oracle.values())

    lengths = [512, 1024] if args.quick else [1024, 4096, 16384]
    methods = {   # transformers' recurrent first: its fp32 output is the reference for the rest of that T
        "hf recurrent": lambda x: hf_recurrent(*x, initial_state=None, output_final_state=False,
                                               use_qk_l2norm_in_kernel=True)[0],
        "kimi chunk": lambda x: chunk_kda(*x, use_qk_l2norm_in_kernel=True)[0],
        "kimi recurrent": lambda x: recurrent_kda(*x, use_qk_l2norm_in_kernel=True)[0],
        "hf chunk": lambda x: hf_chunk(*x, use_qk_l2norm_in_kernel=True)[0],
    }
    rows = []
    with torch.no_grad():
        for T in lengths:
            ref = None
            rounds = args.repeats if T <= 4096 else 1
            for dtype in (torch.float32, torch.bfloat16):
                x = inputs(T, dtype)
                cells = {name: dict(T=T, dtype=str(dtype)[6:], method=name) for name in methods}
                rows += cells.values()
                need = 3.5 * 4 * H * T * 64 * D                           # hf chunk: ~3.3 live [H, T/64, 64, 64, D]
                if T > 4096 or need > 0.8 * _available():
                    cells["hf chunk"]["skipped"] = f"needs ~{need / 2**30:.0f} GiB"
                # interleaved rounds, best time of each; transformers' chunk (minutes, GBs) runs once
                for rnd in range(rounds):
                    for name, fn in methods.items():
                        row = cells[name]
                        if "skipped" in row or (name == "hf chunk" and rnd):
                            continue
                        sec, peak, out = measure(lambda: fn(x))
                        ref = out.float() if ref is None else ref
                        err = rms_ratio(out, ref)
                        del out
                        row["seconds"] = min(sec, row.get("seconds", sec))
                        row["peak_mb"] = max(peak / 2**20, row.get("peak_mb", 0.0))
                        row["err"] = max(err, row.get("err", 0.0))
                        row["ok"] = row["err"] < (1e-5 if dtype == torch.float32 else 2e-2)
                        ok &= row["ok"]

    print(f"KDA core, B=1 H={H} K=V={D}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"oracle (fp64 Eq. 1, T=200): " + ", ".join(f"{k} {v:.1e}" for k, v in oracle.items()))
    print(f"{'T':>6} {'dtype':>9} {'method':>15} {'time s':>9} {'peak MiB':>9} {'rms err':>9}  (vs hf recurrent fp32)")
    for r in rows:
        if "skipped" in r:
            print(f"{r['T']:>6} {r['dtype']:>9} {r['method']:>15}   skipped: {r['skipped']}")
        else:
            print(f"{r['T']:>6} {r['dtype']:>9} {r['method']:>15} {r['seconds']:>9.3f} {r['peak_mb']:>9.0f} "
                  f"{r['err']:>9.1e}{'' if r['ok'] else '  FAIL'}")

    def cell(T, dtype, method):
        return next((r for r in rows if (r["T"], r["dtype"], r["method"]) == (T, dtype, method) and "seconds" in r),
                    None)

    targets = {}
    T4 = 4096 if 4096 in lengths else lengths[-1]
    for dtype in ("float32", "bfloat16"):
        ours, hc, hr = (cell(T4, dtype, m) for m in ("kimi chunk", "hf chunk", "hf recurrent"))
        t = {}
        if ok and ours and hc:
            t["speedup_vs_hf_chunk"] = hc["seconds"] / ours["seconds"]
            t["memory_vs_hf_chunk"] = ours["peak_mb"] / max(hc["peak_mb"], 1e-9)
        if ok and ours and hr:
            t["speedup_vs_hf_recurrent"] = hr["seconds"] / ours["seconds"]
        targets[dtype] = t
    if ok:
        print(f"at T={T4}: " + "; ".join(f"{d}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
                                         for d, t in targets.items()))
    else:
        print("correctness check FAILED: speed-ups withheld")
    met = ok and all(t.get("speedup_vs_hf_chunk", 0) >= 3 and t.get("speedup_vs_hf_recurrent", 0) >= 1.5
                     and t.get("memory_vs_hf_chunk", 1) <= 0.25 for t in targets.values())
    print(json.dumps(dict(bench="kda", shape=dict(B=1, H=H, K=D, V=D), threads=torch.get_num_threads(),
                          correct=ok, oracle=oracle, T_target=T4, targets=targets, targets_met=met,
                          rows=[{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()}
                                for r in rows])))


if __name__ == "__main__":
    main()
