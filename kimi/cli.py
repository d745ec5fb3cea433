"""`kimi` command line: one argparse entry, one subcommand per job.

Each subcommand's flags live beside its code (`add_*_arguments` / `*_main` in its module); a module is imported only
when its subcommand runs, so `kimi info` does not pay for importing the server or torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (help, module, add-arguments function, main function)
COMMANDS = {
    "serve": ("serve the OpenAI-compatible API (and a chat page at /)", "kimi.server.app",
              "add_serve_arguments", "serve_main"),
    "chat": ("chat in the terminal with a served or local model", "kimi.chat_cli", "add_chat_arguments", "chat_main"),
    "generate": ("generate a continuation of a prompt (streams to stdout)", "kimi.cli",
                 "add_generate_arguments", "generate_main"),
    "info": ("print a model's size, cache cost and FLOPs from its config.json", "kimi.cli",
             "add_info_arguments", "info_main"),
    "train": ("train a model with MuonClip / Muon / AdamW", "kimi.train.trainer", "add_train_arguments", "train_main"),
    "data": ("data tools: `kimi data prepare`, `kimi data synth`", "kimi.cli", "add_data_arguments", None),
    "eval": ("evaluations: `kimi eval toolverse`", "kimi.eval.toolverse", "add_eval_arguments", None),
    "plot": ("plot a training run's loss and max-logit curves as PNG", "kimi.train.plot", "add_plot_arguments",
             "plot_main"),
    "convert": ("convert a model directory between bf16, block-FP8 and INT4-expert formats", "kimi.convert",
                "add_convert_arguments", "convert_main"),
    "tokenizer": ("tokenizer tools: `kimi tokenizer train`", "kimi.cli", "add_tokenizer_arguments", None),
}


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a model directory or a bare config.json")


def info_main(args) -> None:
    from kimi.config import ModelConfig
    from kimi.model.cost import describe

    print(describe(ModelConfig.from_pretrained(args.path)))


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: build or reuse the tiny demo model)")
    p.add_argument("--demo-dir", default="runs/demo", help="where the demo model is built when --model is absent")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top token's probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 where the device computes it natively, else float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--quantized", default="keep", choices=["keep", "dequantize"],
                   help="FP8 / INT4 checkpoints: keep the weights quantised (less memory) or dequantise at load")


def generate_main(args) -> None:
    from kimi.engine.engine import LLMEngine
    from kimi.engine.sampling_params import SamplingParams

    model_dir = args.model
    if model_dir is None:
        from kimi.demo import default_model_dir

        model_dir = default_model_dir(args.demo_dir)
    engine = LLMEngine(model_dir, dtype=args.dtype, device=args.device, quantized=args.quantized)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
                            stop=args.stop)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    shown = 0
    try:
        for out in engine.stream(args.prompt, params):
            text = out.text or ""
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    finally:
        engine.shutdown()  # stop the engine's loop thread before the interpreter exits
    sys.stdout.write("\n")


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a byte-level BPE and write it in Kimi's tiktoken format")
    t.add_argument("--input", nargs="+", required=True, help="text files to train on")
    t.add_argument("--vocab-size", type=int, required=True, help="embedding size: base ranks + 256 special ids")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--split-word-prefix", action="store_true",
                   help="learn no token that joins a word to the space or punctuation before it, so a word is the "
                        "same tokens in prose and inside JSON (helps tiny models copy values into tool calls)")
    t.set_defaults(func=tokenizer_train_main)


def tokenizer_train_main(args) -> None:
    from kimi.tokenizer.bpe import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.out, progress=True,
                          split_word_prefix=args.split_word_prefix)
    print(f"wrote {args.out}/tiktoken.model and {args.out}/tokenizer_config.json (vocab size {tok.vocab_size})")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    from kimi.train.data import add_prepare_arguments, prepare_main

    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = sub.add_parser("prepare", help="tokenise text / chat JSONL into memory-mapped training shards")
    add_prepare_arguments(prep)
    prep.set_defaults(func=prepare_main)
    from kimi.data.synth import add_synth_arguments, synth_main

    synth = sub.add_parser("synth", help="synthesise verified tool-use conversations (toolverse) as chat JSONL")
    add_synth_arguments(synth)
    synth.set_defaults(func=synth_main)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s own flags are added (the others are listed by name and help only)."""
    p = argparse.ArgumentParser(prog="kimi", description="Kimi K2 / Kimi Linear: models, training, serving.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, module, add_args, main_fn) in COMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        if command == name:
            mod = importlib.import_module(module)
            getattr(mod, add_args)(s)
            if main_fn:
                s.set_defaults(func=getattr(mod, main_fn))
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except ValueError as e:
        print(f"kimi {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
