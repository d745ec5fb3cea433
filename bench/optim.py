"""What MuonClip buys: a char-level tinyshakespeare run anchored on nanoGPT's CPU recipe, MuonClip vs AdamW.

Question 1 (anchor): nanoGPT's CPU shakespeare-char run (4 layers, 4 heads, width 128, context 64, batch 12,
2,000 iterations = 1.536M tokens, ~0.8M parameters) reaches validation loss ~1.88. With the same token budget,
at most 1.0M parameters, bytes of ../shared/data/tinyshakespeare.txt (= characters on this ASCII text) and the same
first-90% / last-10% split, does a Kimi-Linear-architecture model trained with MuonClip reach <= 1.75?
Question 2: MuonClip vs AdamW on the same model, data and tokens: a small lr sweep (seed 0), then 3 seeds at each
optimizer's best lr: final validation loss mean +- sd, and the tokens MuonClip needs to reach AdamW's final loss,
read off MuonClip's validation curve (its schedule is not shortened, so this overstates what a run tuned to the
shorter budget would need).
Question 3: training throughput (tokens/s) and model FLOPs utilisation against the measured matmul peak.

The model: Kimi Linear's layer stack (3 KDA layers then 1 NoPE MLA layer, hidden 128) with dense SwiGLU FFNs
(no MoE: at 1M parameters the experts would starve the active width), byte vocabulary 256, 965k parameters.
Every run goes through kimi.train.trainer.train, one process per run, --jobs in parallel, --threads each.
Correctness check in the same run: the anchor's loss must fall (final train loss < ln 256 - 1), every validation loss
must be finite, and the anchor's final checkpoint, reloaded with kimi.load_model, must give the validation loss the
trainer logged (< 1e-4); speeds and comparisons are not reported if it fails.

    python bench/optim.py                # everything (hours on a 2-core CPU)
    python bench/optim.py --root DIR     # the same, keeping runs in DIR: a rerun reuses the finished ones
    python bench/optim.py --quick        # MuonClip (--anchor-lr) and AdamW (--adamw-lr) at the full budget, seed 0
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_TOKENS = 12 * 64 * 2000  # nanoGPT's budget: batch 12 x context 64 x 2000 iterations
NANOGPT_VAL = 1.88
TARGET = 1.75
CONFIG = {
    "model_type": "kimi_linear", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 384,
    "moe_intermediate_size": 32, "num_experts": 0, "first_k_dense_replace": 4, "num_hidden_layers": 4,
    "num_attention_heads": 4, "kv_lora_rank": 64, "qk_nope_head_dim": 24, "qk_rope_head_dim": 8, "v_head_dim": 32,
    "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 32, "num_heads": 4,
                           "short_conv_kernel_size": 4},
    "initializer_range": 0.02, "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None,
}


RESULT = "bench_result.json"
JOB_KEYS = ("optimizer", "lr", "seed", "tokens", "batch_tokens", "seq_len", "tau", "warmup", "autocast", "val_points")
# Trainer settings that define a run; a reused checkpoint must have been trained with exactly these.
TRAIN_KEYS = ("optimizer", "lr", "seed", "steps", "batch_tokens", "seq_len", "micro_batch", "adamw_lr", "weight_decay",
              "muon_scale", "qk_clip_tau", "warmup", "schedule", "min_lr_ratio", "decay_frac", "grad_clip", "autocast",
              "val_every")


def run_dir(job: dict) -> Path:
    return Path(job["root"]) / f"{job['optimizer']}-lr{job['lr']:g}-s{job['seed']}"


def train_args(job: dict) -> Namespace:
    """The kimi.train.trainer.train arguments of one bench run: the trainer's own defaults, then the bench's values."""
    from kimi.train.trainer import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    steps = job["tokens"] // job["batch_tokens"]
    args = parser.parse_args(["--data", job["data"], "--out", str(run_dir(job)), "--steps", str(steps),
                              "--batch-tokens", str(job["batch_tokens"]), "--seq-len", str(job["seq_len"])])
    # the trainer's defaults hold the rest (weight decay 0.1, Moonlight scale, cosine to 0.1, grad clip 1.0, ...);
    # TRAIN_KEYS records them with each result
    vars(args).update(model_config=job["config"], optimizer=job["optimizer"], lr=job["lr"], qk_clip_tau=job["tau"],
                      warmup=job["warmup"], autocast=job["autocast"], val_every=max(1, steps // job["val_points"]),
                      keep=1, seed=job["seed"], device="cpu", threads=job["threads"], no_progress=True)
    return args


def summarize(job: dict, wall: float | None) -> dict:
    """A finished run's summary and validation curve, read from its metrics.jsonl.

    wall None: the run predates bench_result.json, so its wall time is derived as the sum of the logged per-step
    times (batch_tokens / tok_s): training steps only, without validation and checkpointing."""
    out = run_dir(job)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    derived = wall is None
    if derived:
        wall = sum(job["batch_tokens"] / r["tok_s"] for r in rows)
    return {**{k: job[k] for k in ("optimizer", "lr", "seed", "tokens")}, "val_loss": rows[-1]["val_loss"],
            "train_loss": rows[-1]["loss"], "wall_s": wall, "wall_derived": derived, "tok_s": rows[-1]["tokens"] / wall,
            "curve": [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r],
            "max_logit": max((r["max_logit"] or 0) for r in rows), "steps": rows[-1]["step"], "out": str(out)}


def finished(job: dict) -> dict | None:
    """The summary of a finished run of exactly `job` already in its run directory, or None if it has none.

    A run directory holding a checkpoint of some other job (other settings, or not trained to the end) is an error,
    not something to overwrite or silently reuse."""
    from kimi.train import checkpoint as ck

    out = run_dir(job)
    ckpt = ck.latest(out)
    if ckpt is None:
        return None
    want = vars(train_args(job))
    state = ck.read_state(ckpt)
    have = state["args"]
    wrong = [f"{k}={have.get(k)!r} (expected {want[k]!r})" for k in TRAIN_KEYS if have.get(k) != want[k]]
    if state["step"] != want["steps"]:
        wrong.append(f"checkpoint step {state['step']} (expected {want['steps']})")
    saved = out / RESULT
    wall = None
    if saved.is_file():
        result = json.loads(saved.read_text())
        wrong += [f"{RESULT} {k}={result['job'].get(k)!r} (expected {job[k]!r})" for k in JOB_KEYS
                  if result["job"].get(k) != job[k]]
        wall = result["wall_s"]
    if wrong:
        raise ValueError(f"{out} holds a different run than the one requested: {', '.join(wrong)}; "
                         f"choose another --root or remove that directory")
    return {**summarize(job, wall), "reused": True}


def run_one(job: dict) -> dict:
    """One training run in this (worker) process; returns its summary and validation curve.

    Writes bench_result.json (the job, the summary, the wall time) into the run directory when the run completes,
    so a later invocation with the same --root can reuse it."""
    import torch

    from kimi.train.trainer import train

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    train(train_args(job))
    wall = time.perf_counter() - t0
    result = summarize(job, wall)
    record = {"job": {k: job[k] for k in JOB_KEYS}, "wall_s": wall,
              "summary": {k: result[k] for k in ("val_loss", "train_loss", "tok_s", "max_logit", "steps")}}
    tmp = run_dir(job) / (RESULT + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(run_dir(job) / RESULT)
    return {**result, "reused": False}


def execute(pool: ProcessPoolExecutor, jobs: list) -> list:
    """Results of `jobs` in order: finished runs found under --root are reused, the others trained in `pool`."""
    reused = [finished(job) for job in jobs]
    fresh = iter(pool.map(run_one, [job for job, r in zip(jobs, reused) if r is None]))
    return [r if r is not None else next(fresh) for r in reused]


def reload_val_loss(run_dir: str, data: str, seq_len: int, threads: int) -> float:
    """Validation loss of a run's final checkpoint, reloaded with kimi.load_model and recomputed from scratch."""
    import torch

    from kimi.model.loader import load_model
    from kimi.train import checkpoint as ck
    from kimi.train.data import IGNORE, Split, eval_batches
    from kimi.train.trainer import token_loss

    torch.set_num_threads(threads)
    model = load_model(ck.latest(run_dir), dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(Split(data, "val"), seq_len, 32):
            total += token_loss(model, batch.input_ids, batch.doc_ids, batch.targets).item()
            count += int((batch.targets != IGNORE).sum())
    return total / count


def matmul_peak(dtype_name: str, threads: int, seconds: float = 2.0) -> float:
    """Measured dense matmul FLOP/s on this machine (1024^3, one process, `threads` threads)."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0)


def tokens_to_reach(curve: list, target: float) -> float | None:
    """First token count at which a validation curve [(tokens, loss)] is <= target (linear between points)."""
    prev = (0, math.inf)
    for tok, loss in curve:
        if loss <= target:
            if math.isinf(prev[1]):
                return float(tok)
            return prev[0] + (tok - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (tok, loss)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="no sweep: MuonClip at --anchor-lr and AdamW at --adamw-lr, "
                                                        "--seeds seeds (default 1)")
    p.add_argument("--runs", default=None,
                   help="explicit runs instead of --quick or the sweep: optimizer:lr:seed,... (e.g. adamw:1e-2:0)")
    p.add_argument("--tokens", type=int, default=NANOGPT_TOKENS, help="training tokens per run (nanoGPT's budget)")
    p.add_argument("--seq-len", type=int, default=128, help="training context")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per optimizer step")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma-separated lr sweep (both optimizers)")
    p.add_argument("--anchor-lr", type=float, default=3e-3, help="MuonClip lr of the quick anchor run")
    p.add_argument("--adamw-lr", type=float, default=3e-3, help="AdamW lr of the quick comparison run")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds at each optimizer's best lr (default 3; 1 with --quick)")
    p.add_argument("--first-seed", type=int, default=0, help="--quick: seeds run are first-seed .. first-seed+seeds-1")
    p.add_argument("--tau", type=float, default=100.0, help="QK-Clip threshold")
    p.add_argument("--warmup", type=int, default=20, help="warmup steps")
    p.add_argument("--autocast", choices=("bf16", "none"), default="none",
                   help="none (fp32; faster than bf16 autocast on CPUs without bf16 matmul units) or bf16")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--val-points", type=int, default=5, help="validation evaluations per run")
    p.add_argument("--data", default=str(DATA), help="tinyshakespeare.txt")
    p.add_argument("--root", default=None,
                   help="directory of the runs, one {optimizer}-lr{lr:g}-s{seed} directory each, plus the prepared "
                        "data; finished runs of the same job found there are reused (default: a fresh temp dir)")
    args = p.parse_args()
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if not Path(args.data).is_file():
        sys.exit(f"{args.data} not found")

    import torch

    from kimi.config import ModelConfig
    from kimi.model.cost import flops_per_token
    from kimi.model.model import build_model
    from kimi.train.data import prepare

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="kimi-bench-optim-"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "manifest.json").is_file():
        prepare([args.data], "bytes", str(root / "data"), val_fraction=0.1, progress=False)
    if (root / "config.json").is_file() and json.loads((root / "config.json").read_text()) != CONFIG:
        raise ValueError(f"{root / 'config.json'} is not this bench's model config: choose another --root")
    (root / "config.json").write_text(json.dumps(CONFIG))
    cfg = ModelConfig.from_dict(CONFIG)
    n_params = sum(t.numel() for t in build_model(cfg).parameters())
    assert n_params <= 1_000_000, n_params
    base = dict(config=str(root / "config.json"), data=str(root / "data"), root=str(root), tokens=args.tokens,
                batch_tokens=args.batch_tokens, seq_len=args.seq_len, tau=args.tau, warmup=args.warmup,
                autocast=args.autocast, threads=args.threads, val_points=args.val_points)
    lrs = [float(x) for x in args.lrs.split(",")]
    results = []
    t_all = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        if args.runs:
            jobs = []
            for spec in args.runs.split(","):
                o, lr, seed = spec.split(":")
                jobs.append(dict(base, optimizer=o, lr=float(lr), seed=int(seed)))
            results += execute(pool, jobs)
            best = {}
            for o in dict.fromkeys(r["optimizer"] for r in results):
                mine = [r for r in results if r["optimizer"] == o]
                best[o] = min({r["lr"] for r in mine},
                              key=lambda lr: statistics.mean(r["val_loss"] for r in mine if r["lr"] == lr))
        elif args.quick:
            jobs = [dict(base, optimizer=o, lr=lr, seed=args.first_seed + s) for s in range(args.seeds)
                    for o, lr in (("muonclip", args.anchor_lr), ("adamw", args.adamw_lr))]
            results += execute(pool, jobs)
            best = {"muonclip": args.anchor_lr, "adamw": args.adamw_lr}
        else:
            jobs = [dict(base, optimizer=o, lr=lr, seed=0) for o in ("muonclip", "adamw") for lr in lrs]
            results += execute(pool, jobs)
            best = {o: min((r for r in results if r["optimizer"] == o), key=lambda r: r["val_loss"])["lr"]
                    for o in ("muonclip", "adamw")}
            jobs = [dict(base, optimizer=o, lr=best[o], seed=s) for o in best for s in range(1, args.seeds)]
            results += execute(pool, jobs)
    wall_all = time.perf_counter() - t_all
    peak_bf16 = matmul_peak("bfloat16", args.threads)
    peak_fp32 = matmul_peak("float32", args.threads)

    anchor = next((r for r in results if r["optimizer"] == "muonclip" and r["lr"] == best.get("muonclip")), results[0])
    reloaded = reload_val_loss(anchor["out"], base["data"], args.seq_len, args.threads)
    ok = (anchor["train_loss"] < math.log(256) - 1 and all(math.isfinite(r["val_loss"]) for r in results)
          and abs(reloaded - anchor["val_loss"]) < 1e-4)
    final = {o: [r["val_loss"] for r in results if r["optimizer"] == o and r["lr"] == best[o]] for o in best}
    stats = {o: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None) for o, v in final.items()}
    muon_runs = [r for r in results if r["optimizer"] == "muonclip" and r["lr"] == best["muonclip"]]
    reach = [tokens_to_reach(r["curve"], stats["adamw"][0]) for r in muon_runs] if "adamw" in stats and muon_runs else [None]
    reach_ratio = (statistics.mean(reach) / args.tokens) if all(x is not None for x in reach) else None
    train_flops = 3 * flops_per_token(cfg, args.seq_len // 2)  # forward + backward, mean causal context
    # per run (one process, --threads threads); wall times derived from old metrics would leave validation out
    timed = [r for r in results if not r["wall_derived"]] or results
    tok_s = statistics.mean(r["tok_s"] for r in timed)
    reused = [r for r in results if r["reused"]]

    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.jobs} runs in parallel x "
          f"{args.threads} thread(s); autocast {args.autocast}; model {n_params:,} params; "
          f"{args.tokens:,} tokens/run = {args.tokens // args.batch_tokens} steps x {args.batch_tokens} "
          f"(seq {args.seq_len}); runs under {root}")
    if reused:
        print(f"reused {len(reused)} finished run(s) from {root}: "
              + ", ".join(Path(r["out"]).name for r in reused))
    print(f"{'optimizer':<10}{'lr':>8}{'seed':>6}{'val loss':>10}{'train loss':>12}{'max logit':>11}{'tok/s':>9}"
          f"{'wall s':>9}")
    for r in results:
        print(f"{r['optimizer']:<10}{r['lr']:>8g}{r['seed']:>6}{r['val_loss']:>10.4f}{r['train_loss']:>12.4f}"
              f"{r['max_logit']:>11.2f}{r['tok_s']:>9.0f}{r['wall_s']:>9.0f}{'*' if r['wall_derived'] else ''}")
    if any(r["wall_derived"] for r in results):
        print("* wall time derived from the per-step tok_s in metrics.jsonl (training steps only, no validation or "
              "checkpointing): the run predates bench_result.json; throughput below leaves these runs out")
    print(f"anchor: {anchor['optimizer']} val loss {anchor['val_loss']:.4f} (target <= {TARGET}, nanoGPT {NANOGPT_VAL}) in "
          f"{anchor['wall_s']:.0f} s wall{'*' if anchor['wall_derived'] else ''} -> "
          f"{'MET' if anchor['val_loss'] <= TARGET else 'NOT met'}")
    for o, (m, s) in stats.items():
        sd = "n/a" if s is None else f"{s:.4f}"
        print(f"{o}: best lr {best[o]:g}, final val loss {m:.4f} +- {sd} over {len(final[o])} seed(s)")
    print("tokens for MuonClip to reach AdamW's final loss: "
          + (f"{reach_ratio:.2f} x the budget (from its validation curve)" if reach_ratio else "not reached"))
    if ok:
        print(f"throughput {tok_s:.0f} tok/s per run (mean of {len(timed)}); {train_flops / 1e6:.1f} MFLOP/token; "
              f"MFU {tok_s * train_flops / peak_bf16:.2%} "
              f"of the measured bf16 matmul peak {peak_bf16 / 1e9:.1f} GFLOP/s "
              f"({tok_s * train_flops / peak_fp32:.2%} of fp32 {peak_fp32 / 1e9:.1f}), {args.threads} thread(s)")
    print(f"check: anchor checkpoint reloaded with kimi.load_model gives val loss {reloaded:.6f} "
          f"(trainer logged {anchor['val_loss']:.6f})")
    if not ok:
        print("correctness check FAILED: no comparison or speed is reported")
    print(json.dumps({
        "bench": "optim", "ok": ok, "quick": args.quick, "params": n_params, "tokens_per_run": args.tokens,
        "anchor_val_loss": anchor["val_loss"], "anchor_target": TARGET, "anchor_met": anchor["val_loss"] <= TARGET,
        "anchor_wall_s": round(anchor["wall_s"], 1), "anchor_wall_derived": anchor["wall_derived"],
        "best_lr": best,
        "val_loss_mean_sd": {o: [round(m, 4), None if s is None else round(s, 4)] for o, (m, s) in stats.items()},
        "seeds": {o: len(v) for o, v in final.items()},
        "muonclip_tokens_to_adamw_final": reach_ratio if ok else None,
        "tok_s": round(tok_s) if ok else None, "mfu_bf16": tok_s * train_flops / peak_bf16 if ok else None,
        "peak_bf16_gflops": round(peak_bf16 / 1e9, 1), "peak_fp32_gflops": round(peak_fp32 / 1e9, 1),
        "total_wall_s": round(wall_all), "runs_wall_s": round(sum(r["wall_s"] for r in results)),
        "reused": len(reused), "reloaded_val_loss": reloaded,
        "runs": [{k: r[k] for k in ("optimizer", "lr", "seed", "val_loss", "reused")} for r in results]}))


if __name__ == "__main__":
    main()
