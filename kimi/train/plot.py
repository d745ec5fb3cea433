"""`kimi plot RUN_DIR`: loss and max-attention-logit curves of a training run as PNG files.

Reads RUN_DIR/metrics.jsonl (written by kimi/train/trainer.py) and writes RUN_DIR/loss.png (train and validation
loss against tokens) and RUN_DIR/max_logit.png (the per-layer max pre-softmax logit of the MLA layers against
steps: the signal QK-Clip caps at tau). matplotlib is imported only here (an optional dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl; expected a `kimi train --out` directory")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty: the run has not finished a step yet")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("kimi plot needs matplotlib: pip install matplotlib") from None

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title=run_dir.name)
    ax.legend()
    ax.grid(alpha=0.3)
    loss_png = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = sorted({name for r in rows for name in (r.get("max_logits") or {})})
    for name in layers:
        pts = [(r["step"], r["max_logits"][name]) for r in rows if name in (r.get("max_logits") or {})]
        ax.plot(*zip(*pts), label=name.removeprefix("model.").removesuffix(".self_attn"), lw=1)
    ax.set(xlabel="step", ylabel="max attention logit", title=f"{run_dir.name}: per-layer max logit")
    if layers:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    logit_png = run_dir / "max_logit.png"
    fig.tight_layout()
    fig.savefig(logit_png, dpi=120)
    plt.close(fig)
    return [loss_png, logit_png]


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a `kimi train --out` directory holding metrics.jsonl")


def plot_main(args) -> None:
    for f in plot_run(args.run_dir):
        print(f"wrote {f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="plot a training run's loss and max-logit curves")
    add_plot_arguments(parser)
    plot_main(parser.parse_args())
