"""Train a byte-level BPE on a corpus and write it in Kimi's tokenizer format.

Training is done by Hugging Face `tokenizers` (its BPE trainer, with Kimi's split pattern as the
pre-tokeniser); the result is converted to `tiktoken.model` ranks and a `tokenizer_config.json` with
Kimi's 256 special ids appended after the base ranks, so kimi's own small models use exactly the token
format of the real checkpoints (../shared/reference/k2.md §6.1-6.2). CLI: `kimi tokenizer train`.
"""

import warnings
from pathlib import Path

from kimi.tokenizer.tokenizer import KIMI_PATTERN, NUM_SPECIAL, Tokenizer

# The trainer needs every single byte (256) plus at least one merge.
MIN_BASE = 257


def byte_to_char() -> dict[int, str]:
    """The reversible byte -> printable-character map that byte-level BPE trainers work in.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP, soft
    hyphen) are shifted to code points 256, 257, ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


# The character Kimi's pattern lets a word carry in front of it (a space, a quote, a bracket), when a letter follows.
WORD_PREFIX = r"[^\r\n\p{L}\p{N}](?=\p{L})"


def train_tokenizer(files: list[str], vocab_size: int, out_dir: str, min_frequency: int = 2,
                    progress: bool = False, split_word_prefix: bool = False) -> Tokenizer:
    """Train on `files` so that base ranks + 256 specials = `vocab_size` (the embedding size), write
    `tiktoken.model` + `tokenizer_config.json` to `out_dir`, and return the loaded tokenizer.

    `split_word_prefix`: learn no merge across a word's leading space or punctuation, so a word is the same
    tokens wherever it stands (` Kyiv` in prose, `"Kyiv` in JSON arguments: the prefix, then identical pieces).
    Kimi's split pattern still applies unchanged at encode time; it is the vocabulary that lacks such tokens.
    A tiny model then copies a value from the conversation into a tool call as a token identity instead of
    having to learn a ` Kyiv` -> `Kyiv` mapping for every word it may meet (kimi's built-in model uses this).

    A small corpus may run out of merges first; then the written vocabulary is smaller (a warning says
    so, and the returned tokenizer's `vocab_size` is the true size).
    """
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    files = [str(f) for f in files]
    if not files:
        raise ValueError("train_tokenizer needs at least one input file")
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"input file not found: {f}")
    if not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
    n_base = vocab_size - NUM_SPECIAL
    if n_base < MIN_BASE:
        raise ValueError(f"vocab_size {vocab_size} too small: need at least {MIN_BASE + NUM_SPECIAL} "
                         f"(256 bytes + 1 merge + {NUM_SPECIAL} special ids)")
    hf = HFTokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(KIMI_PATTERN), behavior="isolated")]
    if split_word_prefix:
        splits.append(pre_tokenizers.Split(Regex(WORD_PREFIX), behavior="isolated"))
    hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=n_base, min_frequency=min_frequency, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    hf.train(files, trainer)

    char_to_byte = {c: b for b, c in byte_to_char().items()}
    ranks = {}
    # The trainer's ids are in merge order (bytes first), which is exactly tiktoken's rank order.
    for token, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]):
        ranks[bytes(char_to_byte[c] for c in token)] = len(ranks)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"trained vocabulary lacks single bytes {missing[:8]}...; cannot be byte-level")
    if len(ranks) < n_base:
        warnings.warn(f"corpus ran out of merges: vocabulary is {len(ranks) + NUM_SPECIAL}, not {vocab_size}")
    tok = Tokenizer(ranks)
    tok.save_pretrained(out_dir)
    return tok
