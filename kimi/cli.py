"""`kimi` command line: one argparse entry, one subcommand per job. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import logging
import sys


def cmd_info(args) -> None:
    from kimi.config import ModelConfig
    from kimi.model.cost import describe

    print(describe(ModelConfig.from_pretrained(args.path)))


def cmd_generate(args) -> None:
    import torch

    from kimi.model.generate import generate
    from kimi.model.loader import load_model
    from kimi.tokenizer.tokenizer import Tokenizer

    model_dir = args.model
    if model_dir is None:
        from kimi.demo import ensure_demo_model

        model_dir = ensure_demo_model(args.demo_dir)
    torch.manual_seed(0)
    model = load_model(model_dir, dtype=args.dtype, device=args.device)
    tok = Tokenizer.from_pretrained(model_dir)
    ids = tok.encode(args.prompt)
    out = generate(model, ids, args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop_ids=tok.stop_ids)[0]
    print(args.prompt + tok.decode(out))


def cmd_tokenizer_train(args) -> None:
    from kimi.tokenizer.bpe import train_tokenizer

    train_tokenizer(args.input, args.vocab_size, args.out)
    print(f"wrote {args.out}/tiktoken.model and {args.out}/tokenizer_config.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kimi", description="Kimi K2 / Kimi Linear: models, training, serving.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="print a model's size, cache cost and FLOPs from its config.json")
    s.add_argument("path", help="a model directory or a bare config.json")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="generate a continuation of a prompt with the reference generate")
    s.add_argument("--model", default=None, help="model directory (default: build or reuse the tiny demo model)")
    s.add_argument("--demo-dir", default="runs/demo", help="where the demo model is built when --model is absent")
    s.add_argument("--prompt", required=True, help="the text to continue")
    s.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the config's)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE and write it in Kimi's tiktoken format")
    t.add_argument("--input", nargs="+", required=True, help="text files to train on")
    t.add_argument("--vocab-size", type=int, required=True, help="base vocabulary size (specials come on top)")
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(func=cmd_tokenizer_train)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except ValueError as e:
        print(f"kimi {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
