"""Training data: `kimi data prepare` (text / chat JSONL -> memory-mapped token shards + manifest) and the packed,
deterministic, resumable loader the trainer reads from.

On disk (OUT/):
  manifest.json             format, tokenizer (vocab size, EOS id, sha256 of tiktoken.model), token dtype, splits
  {train,val}/tokens-NNNNN.bin  the split's token stream, flat uint16 (vocab <= 65536) or uint32, in shards
  {train,val}/mask.bin      uint8 per token, 1 = the token is a training target (chat: assistant tokens only)
  {train,val}/docs.npy      int64 offsets of every document start in the split's stream
Documents: each plain-text file is one document (or several, split on --doc-separator), followed by the tokenizer's
EOS; each chat JSONL line ({"messages": [...], "tools": [...]?}) is one document rendered by the chat renderer
(kimi/tokenizer/chat.py) with its assistant-only loss mask. `--tokenizer bytes` is a tokenizer-free byte-level
vocabulary of 256 (character-level on ASCII text; documents then have no separator token, only recorded starts).
Validation: the last --val-fraction of the stream's tokens, in input order (a document straddling the cut is split),
i.e. nanoGPT's first-90% / last-10% split for a single text. The output depends only on the inputs and flags.

The loader cuts a split's stream into windows of T + 1 tokens (inputs and shifted targets) on a grid of stride T
whose offset and order are drawn per epoch from (seed, epoch); a step takes the next `global rows` windows and
rank r reads its contiguous slice, so any world size sees the same global batch. Its whole state is (epoch, cursor),
saved in checkpoints. Targets that cross a document boundary or are masked out are -100 (ignored); documents are
isolated inside a row by train/packing.py. `whole_documents` also ignores the targets of a document whose start lies
before its row: for chat data, where such a tail's assistant turns would be trained without the system prompt and
tool schemas they answer to (guessing tool and parameter names from priors): 36% of toolverse-2's targets at
T 1,024, 17% at 2,048.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT = "kimi-tokens-v1"
IGNORE = -100  # cross-entropy ignore_index
SHARD_TOKENS = 1 << 26


# ---- prepare ------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """Tokenizer-free byte-level vocabulary: id = byte value, 256 ids, no special tokens."""

    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def load_tokenizer(spec: str):
    """'bytes' or a Kimi tokenizer directory -> (tokenizer, manifest description)."""
    if spec == "bytes":
        return ByteTokenizer(), {"kind": "bytes", "vocab_size": 256, "eos_id": None}
    from kimi.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(spec)
    digest = hashlib.sha256((Path(spec) / "tiktoken.model").read_bytes()).hexdigest()
    return tok, {"kind": "kimi", "dir": str(Path(spec).resolve()), "vocab_size": tok.vocab_size,
                 "eos_id": tok.eos_id, "sha256": digest}


def read_documents(path: Path, tok, separator: str | None):
    """Yield (ids, mask) per document of one input file."""
    if path.suffix == ".jsonl":
        if isinstance(tok, ByteTokenizer):
            raise ValueError(f"{path}: chat JSONL needs a Kimi tokenizer directory (--tokenizer DIR), not 'bytes'")
        from kimi.tokenizer.chat import render_ids

        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                    raise ValueError(f"{path}:{n}: expected an object with a 'messages' list (OpenAI chat format) "
                                     f"and optional 'tools'")
                try:
                    ids, mask = render_ids(row["messages"], tok, tools=row.get("tools"))
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: {e}") from None
                yield ids, mask
        return
    text = path.read_text(encoding="utf-8")
    for doc in (text.split(separator) if separator else [text]):
        if not doc:
            continue
        ids = tok.encode(doc)
        if tok.eos_id is not None:
            ids.append(tok.eos_id)
        yield ids, [1] * len(ids)


def _write_split(out: Path, name: str, tokens: np.ndarray, mask: np.ndarray, starts: np.ndarray,
                 shard_tokens: int) -> dict:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, a in enumerate(range(0, len(tokens), shard_tokens)):
        file = f"tokens-{i:05d}.bin"
        tokens[a:a + shard_tokens].tofile(d / file)
        shards.append({"file": file, "tokens": int(min(shard_tokens, len(tokens) - a))})
    mask.astype(np.uint8).tofile(d / "mask.bin")
    np.save(d / "docs.npy", starts.astype(np.int64))
    return {"tokens": int(len(tokens)), "documents": int(len(starts)), "target_tokens": int(mask.sum()),
            "shards": shards}


def prepare(inputs: list[str], tokenizer: str, out: str, val_fraction: float = 0.1, separator: str | None = None,
            shard_tokens: int = SHARD_TOKENS, progress: bool = True) -> dict:
    """Tokenise `inputs` into OUT (see the module docstring); returns the manifest."""
    if not inputs:
        raise ValueError("data prepare needs at least one --input file")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"input file not found: {p}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    tok, tok_info = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok_info["vocab_size"] <= 1 << 16 else np.uint32
    ids, mask, starts = [], [], []
    n = 0
    from tqdm import tqdm

    bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc="tokenising",
               disable=not progress)
    for p in paths:
        for doc_ids, doc_mask in read_documents(p, tok, separator):
            if not doc_ids:
                continue
            starts.append(n)
            ids.append(np.asarray(doc_ids, dtype=dtype))
            mask.append(np.asarray(doc_mask, dtype=np.uint8))
            n += len(doc_ids)
        bar.update(p.stat().st_size)
    bar.close()
    if n == 0:
        raise ValueError(f"the inputs hold no tokens: {', '.join(map(str, paths))}")
    tokens, mask, starts = np.concatenate(ids), np.concatenate(mask), np.asarray(starts, dtype=np.int64)
    cut = n - int(round(n * val_fraction))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": _write_split(out_dir, "train", tokens[:cut], mask[:cut], starts[starts < cut], shard_tokens)}
    if cut < n:
        val_starts = starts[starts >= cut] - cut
        if not (val_starts[:1] == 0).any():  # the straddling document's tail starts the validation split
            val_starts = np.concatenate([[0], val_starts])
        splits["val"] = _write_split(out_dir, "val", tokens[cut:], mask[cut:], val_starts, shard_tokens)
    manifest = {"format": FORMAT, "tokenizer": tok_info, "dtype": np.dtype(dtype).name, "val_fraction": val_fraction,
                "separator": separator, "inputs": [str(p) for p in paths], "splits": splits}
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / "manifest.json")  # the manifest comes last: a half-written directory is not a dataset
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{data_dir}: no manifest.json; expected a directory written by `kimi data prepare`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


# ---- loading ------------------------------------------------------------------------------------------------
class Split:
    """One split's token stream, mask and document starts, memory-mapped."""

    def __init__(self, data_dir: str | Path, name: str):
        manifest = read_manifest(data_dir)
        if name not in manifest["splits"]:
            raise ValueError(f"{data_dir}: no {name!r} split (has {sorted(manifest['splits'])})")
        info = manifest["splits"][name]
        d = Path(data_dir) / name
        self.manifest = manifest
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        self.shards = [np.memmap(d / s["file"], dtype=manifest["dtype"], mode="r") for s in info["shards"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self.offsets[-1])
        self.mask = np.memmap(d / "mask.bin", dtype=np.uint8, mode="r")
        self.starts = np.load(d / "docs.npy")
        if self.num_tokens != info["tokens"] or len(self.mask) != self.num_tokens:
            raise ValueError(f"{d}: shard sizes do not add up to the manifest's {info['tokens']} tokens")

    def read(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens [b - a] (int64), mask [b - a] (bool) and document index per token [b - a] for stream a..b."""
        parts, pos = [], a
        while pos < b:
            i = np.searchsorted(self.offsets, pos, side="right") - 1
            lo, hi = pos - self.offsets[i], min(self.offsets[i + 1], b) - self.offsets[i]
            parts.append(self.shards[i][lo:hi])
            pos += hi - lo
        tokens = np.concatenate(parts).astype(np.int64)
        docs = np.searchsorted(self.starts, np.arange(a, b), side="right") - 1
        return tokens, self.mask[a:b].astype(bool), docs


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64, IGNORE where not trained on
    doc_ids: torch.Tensor  # [B, T] int64, document index per input token

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.targets, self.doc_ids)))


def make_batch(split: Split, window_starts, seq_len: int, all_tokens: bool = False,
               whole_documents: bool = False) -> Batch:
    """all_tokens: every next token within a document is a target, whatever the loss mask says. whole_documents: no
    targets in a document that began before its row (see the module docstring)."""
    rows = [split.read(int(s), int(s) + seq_len + 1) for s in window_starts]
    tokens = np.stack([r[0] for r in rows])
    mask = np.stack([r[1] for r in rows]) | all_tokens
    docs = np.stack([r[2] for r in rows])
    if whole_documents:
        cut = split.starts[docs[:, 0]] < np.asarray(window_starts)  # [B] the row opens inside a document
        mask &= ~(cut[:, None] & (docs == docs[:, :1]))
    targets = np.where(mask[:, 1:] & (docs[:, 1:] == docs[:, :-1]), tokens[:, 1:], IGNORE)
    return Batch(torch.from_numpy(tokens[:, :-1]), torch.from_numpy(targets), torch.from_numpy(docs[:, :-1]))


class Loader:
    """Deterministic, resumable packed batches of one split (see the module docstring).

    rows: rows per step on this rank; world, rank: data-parallel layout (global rows = rows * world);
    all_tokens, whole_documents: which tokens are targets (make_batch).
    """

    def __init__(self, split: Split, seq_len: int, rows: int, seed: int = 0, rank: int = 0, world: int = 1,
                 all_tokens: bool = False, whole_documents: bool = False):
        if seq_len < 1 or rows < 1:
            raise ValueError(f"seq_len and rows must be >= 1, got {seq_len}, {rows}")
        if split.num_tokens < seq_len + 1:
            raise ValueError(f"--seq-len {seq_len} needs at least {seq_len + 1} tokens per sequence, but the data has "
                             f"only {split.num_tokens}")
        self.split, self.seq_len, self.rows, self.seed, self.rank, self.world = split, seq_len, rows, seed, rank, world
        self.all_tokens, self.whole_documents = all_tokens, whole_documents
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _epoch_windows(self, epoch: int) -> np.ndarray:
        """Start offsets of this epoch's windows, in this epoch's order."""
        g = np.random.default_rng([self.seed, epoch])
        T, N = self.seq_len, self.split.num_tokens
        offset = int(g.integers(0, T)) if N - 1 >= 2 * T else 0  # a fresh grid per epoch, when it leaves room
        n = (N - 1 - offset) // T
        return offset + T * g.permutation(n)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        need = self.rows * self.world
        starts = []
        while len(starts) < need:
            if self._order is None:
                self._order = self._epoch_windows(self.epoch)
            take = self._order[self.cursor:self.cursor + need - len(starts)]
            starts.extend(take.tolist())
            self.cursor += len(take)
            if self.cursor >= len(self._order):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        mine = starts[self.rank * self.rows:(self.rank + 1) * self.rows]
        return make_batch(self.split, mine, self.seq_len, self.all_tokens, self.whole_documents)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "global_rows": self.rows * self.world}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "global_rows"):
            if state[key] != {"seed": self.seed, "seq_len": self.seq_len, "global_rows": self.rows * self.world}[key]:
                raise ValueError(f"data position was saved with {key}={state[key]}, but this run uses "
                                 f"{getattr(self, key, self.rows * self.world)}: resume with the same settings")
        self.epoch, self.cursor, self._order = state["epoch"], state["cursor"], None


def eval_batches(split: Split, seq_len: int, rows: int, max_tokens: int | None = None, rank: int = 0, world: int = 1,
                 all_tokens: bool = False, whole_documents: bool = False):
    """The validation split in order, as non-overlapping windows (first max_tokens tokens at most); rank r takes
    every world-th batch. all_tokens / whole_documents as in make_batch: validation counts the targets training
    does (without whole_documents a row opening mid-conversation is scored on answers it cannot see the question of)."""
    n = (split.num_tokens - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    starts = np.arange(n) * seq_len
    for i, a in enumerate(range(0, n, rows)):
        if i % world == rank:
            yield make_batch(split, starts[a:a + rows], seq_len, all_tokens, whole_documents)


# ---- CLI ----------------------------------------------------------------------------------------------------
def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help="text files (one document each, or split on --doc-separator) and chat .jsonl files "
                        "(one conversation per line: {\"messages\": [...], \"tools\": [...]})")
    p.add_argument("--tokenizer", required=True,
                   help="a Kimi tokenizer directory (tiktoken.model), or 'bytes' for a 256-id byte-level vocabulary")
    p.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out validation share: the last this-fraction of all tokens (default 0.1)")
    p.add_argument("--doc-separator", default=None,
                   help="split plain-text files into documents on this string (default: one document per file)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def prepare_main(args) -> None:
    m = prepare(args.input, args.tokenizer, args.out, args.val_fraction, args.doc_separator, args.shard_tokens,
                progress=not args.no_progress)
    for name, s in m["splits"].items():
        print(f"{name}: {s['tokens']:,} tokens, {s['documents']:,} documents, {len(s['shards'])} shard(s)")
    print(f"wrote {args.out}/manifest.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="tokenise text / chat JSONL into training shards")
    add_prepare_arguments(parser)
    prepare_main(parser.parse_args())
