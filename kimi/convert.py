"""`kimi convert SRC DST --to {bf16,fp32,fp8-block,int4-experts}`: rewrite a model directory in another Kimi weight
format (formats: ../shared/reference/k2.md §5; the writing rules are model/loader.py's save_model).

The source is loaded with every quantised weight kept as stored, so a tensor already in the target format is
copied byte for byte, and the rest is quantised from its fp32 value: FP8 per 128x128 block absmax / 448, INT4 per
32-column group symmetric absmax / 7. Memory: the source model in its own format, plus one output shard.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kimi.model.quantize import FORMATS


class ProgressBar:
    """One line on stderr, redrawn in place at most every 0.2 s: [#####.....] done/total tensors, seconds."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width = label, width
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and done > 1 and now - self.last < 0.2:
            return
        self.last = now
        fill = self.width * done // max(total, 1)
        line = f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{total} tensors {now - self.t0:.1f}s"
        sys.stderr.write(line + ("\n" if done >= total else ""))
        sys.stderr.flush()


def convert(src: str | Path, dst: str | Path, to: str, max_shard_bytes: int = 5 * 2**30, progress=None) -> None:
    """Write SRC's model to DST in format `to`, with config.json, generation_config.json and SRC's tokenizer files."""
    from kimi.model.loader import _load, save_model

    if to not in FORMATS:
        raise ValueError(f"--to {to!r} is not supported, expected one of {', '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"destination {dst} is the source directory; write the conversion somewhere else")
    model = _load(src, None, "cpu", dense_only=())
    save_model(model, dst, format=to, max_shard_bytes=max_shard_bytes, source=src, progress=progress)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source model directory (config.json + safetensors)")
    p.add_argument("dst", help="output directory (created if needed)")
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="bf16 / fp32: dense; fp8-block: Kimi-K2-Instruct's 128x128 block FP8 on every Linear "
                        "but lm_head; int4-experts: Kimi-K2-Thinking's INT4 (group 32) routed experts")
    p.add_argument("--max-shard-size", type=float, default=5.0,
                   help="largest shard in GiB before a new one starts (default 5)")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")


def convert_main(args) -> None:
    if args.max_shard_size <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {args.max_shard_size}")
    bar = None if args.no_progress else ProgressBar(f"{Path(args.src).name} -> {args.to}")
    convert(args.src, args.dst, args.to, max_shard_bytes=int(args.max_shard_size * 2**30), progress=bar)
    print(f"wrote {args.dst} ({args.to})")
