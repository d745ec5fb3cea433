"""Training throughput: kimi's training step vs transformers' on the same weights, bf16 autocast on CPU.

Model: the built-in model (kimi/builtin/model: Kimi Linear, KDA x3 + NoPE MLA, MoE, width 128, ~2M parameters),
fp32 master weights under bf16 autocast as `kimi train` runs it. Data: toolverse-2 conversations rendered and
tokenised by `kimi data prepare`'s own code. One step's forward + backward is timed three ways (the optimizer is
left out: it is not what differs between the two implementations):
  1. transformers KimiLinearForCausalLM (its torch path: fla-core is a GPU package) on rows cut from the token
     stream, loss on every token;
  2. kimi on the same rows with the same loss (the plain [B, T] path): the like-for-like ratio;
  3. kimi as `kimi train` runs: the same tokens, documents isolated inside the packed rows and the loss on
     assistant tokens only (train/packing.py, trainer.token_loss).
Before timing, (1) and (2) are checked to give the same fp32 loss and embedding gradient. Repeats are
interleaved; medians are reported. Prints a table, then one JSON line.

    python bench/train.py [--quick] [--rows N] [--seq T] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kimi
from kimi.builtin import builtin_model_dir
from kimi.train.data import IGNORE, Loader, Split, prepare
from kimi.train.trainer import token_loss


def toolverse_tokens(out: Path, episodes: int) -> Path:
    """Writes `episodes` toolverse-2 training conversations and their token shards under out; returns the shards."""
    from kimi.data.synth import generate, write_jsonl

    write_jsonl(out / "chats.jsonl", generate("train", episodes, version="toolverse-2"))
    prepare([str(out / "chats.jsonl")], str(builtin_model_dir()), str(out / "tokens"), val_fraction=0.0,
            progress=False)
    return out / "tokens"


def every_next_token(ids: torch.Tensor) -> torch.Tensor:
    """Targets for a loss on every token of ids [B, T]: the next token, none after the last."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], 1)


def step_hf(model, ids, autocast: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss  # mean over B * (T - 1) next-token targets
    loss.backward()
    return loss.detach()


def step_kimi(model, ids, doc_ids, targets, autocast: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = token_loss(model, ids, doc_ids, targets) / int((targets != IGNORE).sum())
    loss.backward()
    return loss.detach()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    ap.add_argument("--rows", type=int, default=None, help="rows per step (default 4, quick 2)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per row")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per side (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    rows = args.rows or (2 if args.quick else 4)
    repeats = args.repeats or (3 if args.quick else 7)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        episodes = max(60, rows * args.seq * (repeats + 2) // 350)  # toolverse-2 averages ~390 tokens each
        loader = Loader(Split(toolverse_tokens(Path(tmp), episodes), "train"), args.seq, rows, seed=0)
        batches = list(itertools.islice(loader, repeats + 1))  # read while the shards exist
    src = builtin_model_dir()
    ref = transformers.KimiLinearForCausalLM.from_pretrained(src, dtype=torch.float32).train()
    ours = kimi.load_model(src, dtype=torch.float32).train()

    # Same function: fp32 loss and embedding gradient of (1) and (2) on the first batch.
    ids = batches[0].input_ids
    loss_ref, loss_ours = step_hf(ref, ids, False), step_kimi(ours, ids, None, every_next_token(ids), False)
    grad_ref, grad_ours = ref.model.embed_tokens.weight.grad, ours.model.embed_tokens.weight.grad
    loss_err = abs(loss_ref.item() - loss_ours.item())
    grad_err = ((grad_ref - grad_ours).abs().max() / grad_ref.abs().max()).item()
    same = loss_err <= 1e-4 * abs(loss_ref.item()) and grad_err <= 1e-3

    sides = {"transformers": lambda b: step_hf(ref, b.input_ids, True),
             "kimi": lambda b: step_kimi(ours, b.input_ids, None, every_next_token(b.input_ids), True),
             "kimi_packed": lambda b: step_kimi(ours, b.input_ids, b.doc_ids, b.targets, True)}
    times = {name: [] for name in sides}
    for i, b in enumerate(batches):
        for name, fn in sides.items():
            for m in (ref, ours):
                m.zero_grad(set_to_none=True)
            t = timed(lambda: fn(b))
            if i:  # the first batch warms up
                times[name].append(t)
    tokens = rows * args.seq
    tok_s = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    res = {"bench": "train", "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s)",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "model": f"built-in ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters)",
           "rows": rows, "seq": args.seq, "repeats": repeats,
           "fp32_same_loss_and_grad": same, "fp32_loss_abs_err": loss_err, "fp32_embed_grad_rel_err": grad_err,
           "fwd_bwd_tok_s": {k: round(v) for k, v in tok_s.items()},
           "speedup_vs_transformers": round(tok_s["kimi"] / tok_s["transformers"], 2),
           "target_fraction_packed": round(sum(int((b.targets != IGNORE).sum()) for b in batches)
                                           / (len(batches) * tokens), 3)}
    print(f"{'side':14s} {'fwd+bwd tok/s':>14s}")
    for name, v in tok_s.items():
        print(f"{name:14s} {v:14.0f}")
    print(f"kimi / transformers: {res['speedup_vs_transformers']}x   (fp32 same loss and gradient: {same})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
