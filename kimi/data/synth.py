"""toolverse splits and generation: `kimi data synth` (../shared/reference/synthetic.md §A5-A6).

Episode `i` of split `s` is drawn from `sha256(VERSION, s, i, attempt)` alone (no global RNG, no clock), so the
same version and seed give byte-identical output, and any episode can be regenerated on its own (the evaluation
does exactly that). Train/eval prompt overlap is impossible by construction: every prompt (tools + messages up
to the first user turn) hashes to a side, training keeps only train-side prompts and the evaluation splits only
eval-side ones, redrawing (attempt + 1) otherwise.

Splits: `train`; `iid` (the training distribution, unseen prompts); `compositional` (tool pairs never chained in
training); `renamed` (held-out tool/parameter names and descriptions); `longer` (3-call chains, 3-turn
follow-ups); `ood_values` (prices/ages 100-999, years 2031-2040); `relevance` (half no-call).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

from kimi.data import families as F
from kimi.data.episode import Builder, Episode
from kimi.data.evolution import declare
from kimi.data.tools import TOOLS, dump
from kimi.data.user import PERSONAS
from kimi.data.world import World, seed_of

# toolverse-2: a declared tool name fixes its parameter spellings (data/evolution.py); toolverse-1 drew each
# parameter's spelling on its own and is kept only to replay the first stages of the built-in model's recipe.
VERSIONS = ("toolverse-1", "toolverse-2")
VERSION = VERSIONS[-1]
TRAIN_MIX = {"no_call": 10, "single": 30, "parallel": 12, "chain": 20, "follow_up": 12, "error": 10, "clarify": 6}
# split -> (family mix, world values are big, held-out names, chains, follow-up turns)
SPLITS = {
    "train": (TRAIN_MIX, False, False, F.CHAINS, 2),
    "iid": (TRAIN_MIX, False, False, F.CHAINS, 2),
    "compositional": ({"chain": 1}, False, False, F.HELD_OUT_CHAINS, 2),
    "renamed": (TRAIN_MIX, False, True, F.CHAINS, 2),
    "longer": ({"chain": 1, "follow_up": 1}, False, False, F.LONG_CHAINS, 3),
    "ood_values": (TRAIN_MIX, True, False, F.CHAINS, 2),
    "relevance": ({**{k: v for k, v in TRAIN_MIX.items() if k != "no_call"}, "no_call": 90}, False, False,
                  F.CHAINS, 2),
}
EVAL_SPLITS = tuple(s for s in SPLITS if s != "train")
EVAL_SHARE = 10  # 1 in EVAL_SHARE prompts belongs to the evaluation side


def prompt_key(ep: Episode) -> str:
    """What the model sees before its first turn: tools, system prompt and the first user message."""
    head = []
    for m in ep.messages:
        head.append(m)
        if m["role"] == "user":
            break
    return dump([ep.tools, head])


def eval_side(ep: Episode) -> bool:
    return hashlib.sha256(prompt_key(ep).encode()).digest()[0] % EVAL_SHARE == 0


def _draw(split: str, index: int, seed: int, version: str) -> Episode:
    mix, big, held_out, chains, follow_turns = SPLITS[split]
    rng = random.Random(seed)
    world = World(rng.getrandbits(64), big)
    world_seed = world.seed
    family = rng.choices(list(mix), weights=list(mix.values()))[0]
    if family == "chain":
        intent, needed, run = F.plan_chain(rng, world, big, chains)
    elif family == "follow_up":
        intent, needed, run = F.plan_follow_up(rng, world, big, follow_turns)
    else:
        intent, needed, run = F.FAMILIES[family](rng, world, big)
    others = sorted(set(TOOLS) - needed)
    # distractors: at least one, and few, since declarations dominate the context (~60 tokens each)
    n_extra = rng.randint(2, 3) if not needed else rng.randint(1, 2 if len(needed) < 3 else 1)
    shown = sorted(needed) + rng.sample(others, n_extra)
    rng.shuffle(shown)
    tools, bindings = [], {}
    for t in shown:
        spec, b = declare(t, rng, held_out, tied=version != "toolverse-1")
        tools.append(spec)
        bindings[b.name] = b
    ep = Episode(split, index, world_seed, big, family, intent, tools, bindings, version)
    b = Builder(ep, world, rng, tool_names=rng.random() < 0.5)
    b.system(rng.choice(PERSONAS) if rng.random() < 0.7 else None)
    run(b)
    ep.final_state = world.snapshot()
    return ep


def episode(split: str, index: int, version: str = VERSION) -> Episode:
    """Episode `index` of `split`, redrawn until its prompt lies on the split's side."""
    if version not in VERSIONS:
        raise ValueError(f"unknown toolverse version {version!r}; expected one of {', '.join(VERSIONS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown toolverse split {split!r}; expected one of {', '.join(SPLITS)}")
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"episode index must be an int >= 0, got {index!r}")
    want_eval = split != "train"
    for attempt in range(1000):
        ep = _draw(split, index, seed_of(version, split, index, attempt), version)
        if eval_side(ep) == want_eval:
            return ep
    raise RuntimeError(f"no {split} episode {index} on its side after 1000 draws")


def generate(split: str, n: int, start: int = 0, check: bool = True, version: str = VERSION):
    """Yield episodes start..start+n-1 of `split`, each verified (VerificationError on a generator bug)."""
    from kimi.data.verify import verify

    for i in range(start, start + n):
        ep = episode(split, i, version)
        if check:
            verify(ep)
        yield ep


def write_jsonl(path: Path, episodes) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for ep in episodes:
            f.write(json.dumps(ep.row(), ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    return n


def write_corpus(path: Path, episodes) -> int:
    """Rendered conversations with the control tokens cut out, one per line: BPE training text that matches
    what the model reads (the control tokens are added to the vocabulary separately)."""
    from kimi.tokenizer.chat import render
    from kimi.tokenizer.parser import MARKERS

    pattern = re.compile("|".join(re.escape(m) for m in (*MARKERS, "<|im_system|>", "<|im_user|>",
                                                        "<|im_assistant|>", "<|im_middle|>")))
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for ep in episodes:
            f.write(pattern.sub("\n", render(ep.messages, tools=ep.tools, add_generation_prompt=False)) + "\n")
            n += 1
    return n


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory: train.jsonl and one {split}.jsonl per eval split")
    p.add_argument("--train", type=int, default=20000, help="training episodes")
    p.add_argument("--eval", type=int, default=500, help="episodes per evaluation split (0 = none)")
    p.add_argument("--splits", nargs="+", default=list(EVAL_SPLITS), choices=list(EVAL_SPLITS),
                   help="evaluation splits to write")
    p.add_argument("--corpus", type=int, default=0,
                   help="also write corpus.txt: this many training conversations as plain text, for BPE training")
    p.add_argument("--no-verify", action="store_true", help="skip the verifier (it is on by default)")
    p.add_argument("--version", default=VERSION, choices=VERSIONS,
                   help="generator version (an older one replays old data byte for byte)")


def synth_main(args) -> None:
    if args.train < 0 or args.eval < 0:
        raise ValueError(f"--train and --eval must be >= 0, got {args.train} and {args.eval}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("train", args.train)] + [(s, args.eval) for s in args.splits if args.eval]
    rows = []
    for split, n in jobs:
        t0 = time.perf_counter()
        written = write_jsonl(out / f"{split}.jsonl", generate(split, n, check=not args.no_verify,
                                                                version=args.version))
        dt = time.perf_counter() - t0
        rows.append({"split": split, "episodes": written, "seconds": round(dt, 2),
                     "episodes_per_s": round(written / dt) if dt else None})
        print(f"{split:>14}  {written:7d} episodes  {dt:6.1f} s  {written / max(dt, 1e-9):8.0f} ep/s", file=sys.stderr)
    if args.corpus:
        write_corpus(out / "corpus.txt", generate("train", min(args.corpus, args.train), check=False,
                                                  version=args.version))
    print(json.dumps({"version": args.version, "out": str(out), "verified": not args.no_verify, "splits": rows}))


if __name__ == "__main__":  # python -m kimi.data.synth: the same as `kimi data synth`
    parser = argparse.ArgumentParser(prog="kimi data synth", description=__doc__.split("\n")[0])
    add_synth_arguments(parser)
    synth_main(parser.parse_args())
