"""`kimi train`: train a Kimi K2 / Kimi Linear model with MuonClip (or Muon, AdamW) on prepared token shards.

One step = one optimizer update over --batch-tokens tokens (global, all ranks), split into micro-batches of
--micro-batch rows (gradient accumulation). The loss is the mean over every target token of the global batch, so
the update does not depend on how the batch is split across micro-batches or data-parallel ranks. Forward passes
run under bf16 autocast over fp32 master weights where the device computes bf16 natively, in plain fp32 elsewhere
(--autocast auto; kimi/ops/dtypes.py; bf16 / none force either); raw gradients are clipped
before the optimizer (clipping Muon's orthogonalised update would shrink every step, muon.md §5.4); QK-Clip then
rescales heads whose max logit exceeded tau (train/qk_clip.py). Packed documents are isolated (train/packing.py).

Data parallel: launch with `torchrun --nproc-per-node N -m kimi.train.trainer ...` (or `kimi train` under torchrun);
DDP over gloo (CPU) or NCCL (GPU). Gradients are all-reduced before the optimizer, so every rank orthogonalises the
same full-matrix gradient (muon.md §4) and holds identical weights; QK-Clip's maxima are MAX-reduced over ranks.

Outputs in --out: metrics.jsonl (one JSON object per step and per validation), step-NNNNNN/ checkpoints
(train/checkpoint.py; each is an HF-layout model directory), and a progress bar. `--resume` continues from the
newest checkpoint exactly: on CPU the loss trace equals the uninterrupted run's bit for bit (tests/test_trainer.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kimi.ops.dtypes import bf16_is_fast
from kimi.train.data import IGNORE, Loader, Split, eval_batches, read_manifest
from kimi.train.packing import packed_forward

log = logging.getLogger("kimi")

SCHEDULES = ("cosine", "wsd")


def lr_factor(step: int, steps: int, warmup: int, schedule: str, min_ratio: float, decay_frac: float) -> float:
    """Multiplier on the base lr for update `step` (1-based): linear warmup over `warmup` updates, then cosine to
    min_ratio at `steps`, or WSD (flat, then a linear decay to min_ratio over the last decay_frac of the run)."""
    if warmup > 0 and step <= warmup:
        return step / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = steps - round(decay_frac * steps)
    if step <= decay_start:
        return 1.0
    return 1 - (1 - min_ratio) * (step - decay_start) / max(1, steps - decay_start)


# ---- setup and validation -----------------------------------------------------------------------------------
def load_config(path: str | None, init_from: str | None):
    from kimi.config import ModelConfig

    if path is None and init_from is None:
        raise ValueError("give --model-config (a config.json or a model directory) or --init-from")
    return ModelConfig.from_pretrained(path if path is not None else init_from)


def check_args(args, cfg, manifest: dict, world: int) -> tuple[int, int, int]:
    """Validate the run before any training; returns (rows per rank, micro-batch rows, accumulation steps)."""
    vocab = manifest["tokenizer"]["vocab_size"]
    if cfg.vocab_size < vocab:
        raise ValueError(f"model vocab_size {cfg.vocab_size} is smaller than the data's tokenizer vocabulary {vocab} "
                         f"({args.data}): the config and the data were made for different tokenizers")
    for name in ("steps", "batch_tokens", "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if args.batch_tokens % (args.seq_len * world):
        raise ValueError(f"--batch-tokens {args.batch_tokens} must be a multiple of --seq-len x processes = "
                         f"{args.seq_len} x {world}")
    rows = args.batch_tokens // args.seq_len // world
    micro = args.micro_batch or rows
    if rows % micro:
        raise ValueError(f"--micro-batch {micro} must divide the {rows} rows each process takes per step")
    if not 0 <= args.warmup < args.steps + 1 or args.lr <= 0:
        raise ValueError(f"need 0 <= --warmup <= --steps and --lr > 0, got warmup={args.warmup}, lr={args.lr}")
    train = manifest["splits"]["train"]
    if train["tokens"] < args.seq_len + 1:
        raise ValueError(f"--seq-len {args.seq_len} is larger than the training data ({train['tokens']} tokens in "
                         f"{args.data}); use a shorter --seq-len or more data")
    if train["target_tokens"] == 0:
        raise ValueError(f"{args.data}: the training split has no target tokens (an empty dataset)")
    return rows, micro, rows // micro


def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; initialises the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def build(args, cfg, device, ckpt):
    """Model (fp32 master weights) and optimizer; from the checkpoint, --init-from, or a fresh init."""
    from kimi.model.loader import load_model
    from kimi.model.model import build_model
    from kimi.train.optim import build_optimizer

    source = ckpt if ckpt is not None else args.init_from
    if source is not None:
        model = load_model(source, dtype=torch.float32, device=device)
        # training keeps fp32 master weights, so a checkpoint's config says float32 whatever --model-config says
        if model.config.replace(torch_dtype=cfg.torch_dtype) != cfg:
            what = "the checkpoint in --out" if ckpt is not None else "--init-from"
            raise ValueError(f"{what} ({source}) holds a different model than --model-config: "
                             f"{_config_diff(model.config, cfg)}")
    else:
        model = build_model(cfg, torch.float32, device, seed=args.seed)
    model.train()
    extra = {} if args.optimizer == "adamw" else {"scale": args.muon_scale}
    opt = build_optimizer(model, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                          qk_clip_tau=args.qk_clip_tau, adamw_lr=args.adamw_lr, **extra)
    return model, opt


def _config_diff(a, b) -> str:
    import dataclasses

    diff = [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in dataclasses.fields(a)
            if f.compare and getattr(a, f.name) != getattr(b, f.name)]
    return "; ".join(diff[:4]) or "(configs differ)"


def tokenizer_source(manifest: dict) -> str | None:
    tok = manifest["tokenizer"]
    return tok.get("dir") if tok.get("kind") == "kimi" and Path(tok.get("dir", "")).is_dir() else None


# ---- the loop -----------------------------------------------------------------------------------------------
def token_loss(model, input_ids: torch.Tensor, doc_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy (fp32) over the non-ignored targets of one packed batch [B, T]. Logits are made only
    where there is a target: assistant tokens are ~15% of a toolverse row, and the vocabulary projection and
    softmax of every position cost ~10% of a small model's step."""
    where = (targets != IGNORE).flatten().nonzero().flatten()
    logits = packed_forward(model, input_ids, doc_ids, logits_at=where)
    return F.cross_entropy(logits.float(), targets.flatten()[where], reduction="sum")


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model, split: Split, args, device, rank: int, world: int) -> float:
    """Mean validation cross-entropy (nats/token) over the first --val-tokens of the validation split, counting the
    targets training counts (--all-tokens, --whole-documents)."""
    model.eval()
    total, count = 0.0, 0
    rows = args.micro_batch or max(1, args.batch_tokens // args.seq_len // world)
    for batch in eval_batches(split, args.seq_len, rows, args.val_tokens, rank, world, all_tokens=args.all_tokens,
                              whole_documents=args.whole_documents):
        batch = batch.to(device)
        with autocast(args, device):
            total += token_loss(model, batch.input_ids, batch.doc_ids, batch.targets).item()
        count += int((batch.targets != IGNORE).sum())
    model.train()
    total, count = _all_sum([total, count], device)
    return total / max(count, 1)


def autocast(args, device):
    if args.autocast == "none" or (args.autocast == "auto" and not bf16_is_fast(device)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train(args) -> dict:
    """Run the training described by `args` (see add_train_arguments); returns a summary dict."""
    from kimi.train import checkpoint as ck

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    cfg = load_config(args.model_config, args.init_from)
    manifest = read_manifest(args.data)
    rows, micro, accum = check_args(args, cfg, manifest, world)
    out = Path(args.out)
    ckpt = ck.latest(out) if args.resume else None
    if args.resume:
        log.info("resuming from %s" if ckpt else "no checkpoint in %s: starting from step 0", ckpt or out)
    if ckpt is None and any(out.glob("step-*")) and not args.resume:
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    torch.manual_seed(args.seed)
    model, opt = build(args, cfg, device, ckpt)
    base_lrs = [g["lr"] for g in opt.param_groups]  # before a resume overwrites them with the scheduled values
    loader = Loader(Split(args.data, "train"), args.seq_len, rows, seed=args.seed, rank=rank, world=world,
                    all_tokens=args.all_tokens, whole_documents=args.whole_documents)
    val = Split(args.data, "val") if "val" in manifest["splits"] else None
    start = 0
    if ckpt is not None:
        saved = ck.read_state(ckpt)["optimizer_name"]
        if saved != args.optimizer:
            raise ValueError(f"{ckpt} was trained with --optimizer {saved}, not {args.optimizer}")
        state = ck.load_training_state(ckpt, opt)
        loader.load_state_dict(state["data"])
        start = state["step"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out / "metrics.jsonl", start)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or args.no_progress, desc="train", dynamic_ncols=True)
    tokens_per_step = args.batch_tokens
    last_val, last = None, {}
    t_run = time.perf_counter()
    try:
        stop = min(args.steps, args.stop_after or args.steps)
        for step in range(start + 1, stop + 1):
            t0 = time.perf_counter()
            factor = lr_factor(step, args.steps, args.warmup, args.schedule, args.min_lr_ratio, args.decay_frac)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor
            batch = next(loader).to(device)
            targets = int((batch.targets != IGNORE).sum())
            (n_global,) = _all_sum([targets], device)
            loss_sum = torch.zeros((), device=device)
            for i in range(accum):
                rows_i = slice(i * micro, (i + 1) * micro)
                sync = contextlib.nullcontext() if (world == 1 or i == accum - 1) else net.no_sync()
                with sync:
                    with autocast(args, device):
                        part = token_loss(net, batch.input_ids[rows_i], batch.doc_ids[rows_i], batch.targets[rows_i])
                    # DDP averages gradients over ranks: scale by world so the result is the global-token mean
                    (part * (world / max(n_global, 1))).backward()
                loss_sum += part.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0
                                                       else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            (loss_total,) = _all_sum([loss_sum.item()], device)
            loss = loss_total / max(n_global, 1)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            maxima = {name: float(m.max()) for name, m in (opt.max_logits or {}).items()}
            dt = time.perf_counter() - t0
            last = {"step": step, "loss": loss, "lr": opt.param_groups[0]["lr"], "tokens": step * tokens_per_step,
                    "tok_s": tokens_per_step / dt, "grad_norm": float(grad_norm),
                    "max_logit": max(maxima.values()) if maxima else None, "max_logits": maxima}
            if args.val_every and val is not None and (step % args.val_every == 0 or step == args.steps):
                last_val = evaluate(model, val, args, device, rank, world)
                last["val_loss"] = last_val
            if metrics is not None:
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{last['tok_s']:.0f}", lr=f"{last['lr']:.2e}",
                            max_logit="-" if last["max_logit"] is None else f"{last['max_logit']:.1f}",
                            refresh=False)
            bar.update(1)
            if (args.save_every and step % args.save_every == 0) or step == stop:
                if rank == 0:
                    state = {"data": loader.state_dict(), "optimizer_name": args.optimizer,
                             "args": {k: v for k, v in vars(args).items() if k != "func"}}
                    ck.save_checkpoint(out, step, model, opt, state, source=tokenizer_source(manifest), keep=args.keep)
                if world > 1:
                    dist.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return {"steps": stop, "final_loss": last.get("loss"), "val_loss": last_val,
            "tokens": stop * tokens_per_step, "seconds": time.perf_counter() - t_run,
            "checkpoint": str(ck.latest(out)) if rank == 0 else None}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps <= step (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# ---- CLI ----------------------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", default=None,
                   help="the model to train: a config.json or a model directory (default: --init-from's config)")
    p.add_argument("--data", required=True, help="a directory written by `kimi data prepare`")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl and step-NNNNNN checkpoints")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-tokens", type=int, required=True,
                   help="tokens per optimizer step over all processes (a multiple of --seq-len x processes)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per packed training row")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="rows per forward pass; fewer than a process's rows per step means gradient accumulation "
                        "(default 0: all of them)")
    p.add_argument("--optimizer", choices=("muonclip", "muon", "adamw"), default="muonclip",
                   help="muonclip = Muon + AdamW + QK-Clip; muon = no clip; adamw = AdamW on every parameter")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate (Muon's Moonlight scaling shares it with AdamW)")
    p.add_argument("--adamw-lr", type=float, default=None,
                   help="peak lr of the AdamW group when Muon is used (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay, every group")
    p.add_argument("--muon-scale", choices=("moonlight", "keller"), default="moonlight",
                   help="Muon update scale: moonlight 0.2*sqrt(max(A,B)) (AdamW lr carries over) or keller")
    p.add_argument("--qk-clip-tau", type=float, default=100.0, help="QK-Clip threshold on the max attention logit")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="lr after warmup: cosine decay, or wsd (flat, then linear decay)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    p.add_argument("--decay-frac", type=float, default=0.2, help="wsd: fraction of the steps spent decaying")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the global norm of the raw gradients before the optimizer (0 = off)")
    p.add_argument("--autocast", choices=("auto", "bf16", "none"), default="auto",
                   help="bf16 autocast over fp32 master weights, or plain fp32; auto: bf16 where the device computes "
                        "it natively (CUDA, CPUs with oneDNN bf16 kernels), else fp32")
    p.add_argument("--all-tokens", action="store_true",
                   help="train on every token, ignoring the data's loss mask (e.g. a warm-up on whole chat "
                        "conversations; the validation loss keeps the mask)")
    p.add_argument("--whole-documents", action="store_true",
                   help="no loss on a document that began before its row (chat data: those assistant turns would be "
                        "trained without the system prompt and tools they answer to)")
    p.add_argument("--val-every", type=int, default=100, help="validation loss every N steps and at the end (0 = off)")
    p.add_argument("--val-tokens", type=int, default=None, help="validate on at most this many tokens (default all)")
    p.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps (always at the end; 0 = end only)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop (with a checkpoint) after this step, as if interrupted; the schedule still spans --steps")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep (0 = all)")
    p.add_argument("--init-from", default=None, help="start from this model directory's weights")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="seed for the initialisation and the data order")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def train_main(args) -> None:
    summary = train(args)
    if summary["checkpoint"] is not None:
        print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="train a Kimi model (see `kimi train --help`)")
    add_train_arguments(parser)
    train_main(parser.parse_args())
