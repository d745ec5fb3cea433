"""Kimi's tokenizer: tiktoken BPE ranks, 256 reserved special ids after them, Kimi's split pattern.

Reads the real files (`tiktoken.model` + `tokenizer_config.json`, as shipped with Kimi K2 / Kimi Linear)
and the ones `kimi.tokenizer.bpe` writes. tiktoken is the engine; this file only adds what Kimi's own
tokenizer does around it: special-id naming, chunking of long inputs, and a streaming detokeniser.
Format and pattern are described in ../shared/reference/k2.md §6.1-6.2 and kda.md §6.
"""

import array
import base64
import codecs
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiktoken

# Kimi's pre-tokeniser: Han runs; two Latin-style word shapes that exclude Han (set intersection `&&`,
# which tiktoken's Rust regex engine understands); digits in groups of up to three; punctuation runs;
# newlines; whitespace. The alternation order matters.
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTION}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTION}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

NUM_SPECIAL = 256

# Named special tokens, as offsets after the base ranks (offset 2 is id 163586 in the real K2 files).
# Unnamed offsets become `<|reserved_token_{id}|>`.
K2_SPECIAL_NAMES = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
    18: "<|media_start|>", 19: "<|media_content|>", 20: "<|media_end|>", 21: "<|media_pad|>",
    22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]",
}

# Kimi's own tokenizer cuts input into 400k-character windows, and cuts any run of more than 25k
# whitespace or non-whitespace characters inside a window, so no single tiktoken piece gets huge.
_WINDOW_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
# array typecode of tiktoken's uint32 id buffers
_UINT32 = next(t for t in "IL" if array.array(t).itemsize == 4)


def reserved_name(token_id: int) -> str:
    return f"<|reserved_token_{token_id}|>"


# Every character `str.isspace` accepts (Kimi's per-character whitespace test): the ten ASCII ones first,
# commonest first. A test checks this table against all code points. Searching a string for a character
# wider than any it holds returns at once, so non-ASCII text pays only for the ones it could contain.
_SPACES = (" \n\t\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
           "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_ASCII_SPACES = _SPACES[:10]


def _first_space(s: str, lo: int, hi: int, spaces: str) -> int:
    """Index of the first whitespace character in s[lo:hi], else hi. One C `find` (memchr) per whitespace
    character, each bounded by the best hit so far, so ordinary text costs a few characters' look."""
    for c in spaces:
        i = s.find(c, lo, hi)
        if i >= 0:
            hi = i
    return hi


def _last_space(s: str, lo: int, hi: int, spaces: str) -> int:
    """Index of the last whitespace character in s[lo:hi], else lo - 1."""
    last = lo - 1
    for c in spaces:
        i = s.rfind(c, last + 1, hi)
        if i >= 0:
            last = i
    return last


def _long_runs(text: str, lo: int, hi: int, max_run: int):
    """(start, end) of each maximal run of whitespace (`str.isspace`) or of non-whitespace longer than
    `max_run` in text[lo:hi] (runs stop at lo and hi), in order.

    Such a run contains a whole block of (max_run+1)//2 characters, aligned from lo, that is all
    whitespace or has none, so only those blocks are looked at; a block is dismissed after a bounded
    `find` or two, and a uniform one is grown to its run with C string scans. Works on offsets into the
    whole text: copying a 400k-character window costs more (fresh pages) than finding the runs in it.
    """
    block = (max_run + 1) // 2
    spaces = _ASCII_SPACES if text.isascii() else _SPACES
    done = lo  # runs end at or before `done`; the characters at done-1 and done differ in class
    for b in range(lo, hi - block + 1, block):
        if b < done:
            continue
        # The run holding this block starts after b - block (else the previous block lay inside it and
        # was found) and at or after `done` (the previous run ends there, and the class changes).
        floor = max(done, b - block)
        first = _first_space(text, b, b + block, spaces)
        # The run's end is sought in steps that double from one block, so a search never looks much
        # further than twice the run past its end (a window can hold 16 runs of 25k characters).
        if first == b + block:
            start = _last_space(text, floor, b, spaces) + 1
            end, step = first, block
            while end < hi:
                stop = min(end + step, hi)
                end = _first_space(text, end, stop, spaces)
                if end < stop:
                    break
                step *= 2
        elif first == b and text[b:b + block].isspace():
            head = text[floor:b]
            start = b - (len(head) - len(head.rstrip()))
            end, step = b + block, block
            while end < hi:
                part = text[end:min(end + step, hi)]
                rest = len(part.lstrip())
                end += len(part) - rest
                if rest:
                    break
                step *= 2
        else:
            continue
        if end - start > max_run:
            yield start, end
        done = end


def split_long_input(text: str, max_run: int = _MAX_RUN_CHARS, window: int = _WINDOW_CHARS) -> list[str]:
    """Cut `text` exactly where Kimi's tokenizer does before calling tiktoken: into `window`-character
    windows, and inside each window every run of whitespace or non-whitespace longer than `max_run`
    every `max_run` characters counted from the run's first character."""
    if len(text) <= max_run:
        return [text]
    pieces = []
    for w0 in range(0, len(text), window):
        w1 = min(w0 + window, len(text))
        cut = w0
        for start, end in _long_runs(text, w0, w1, max_run):
            for edge in range(start + max_run, end, max_run):
                pieces.append(text[cut:edge])
                cut = edge
        pieces.append(text[cut:w1])
    return pieces


def read_tiktoken_model(path) -> dict[bytes, int]:
    """`base64(bytes) rank` per line -> {bytes: rank}; ranks must be exactly 0..n-1."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{lineno}: expected 'base64(bytes) rank', got {line[:80]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: token is not valid base64: {parts[0][:80]!r}") from e
            ranks[token] = int(parts[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be unique and cover 0..{len(ranks) - 1} with no gaps")
    return ranks


def write_tiktoken_model(path, ranks: dict[bytes, int]) -> None:
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def _token_content(value, field):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config.json: {field} must be a string or {{'content': str}}, got {value!r}")


def _select_template(template, source):
    """HF allows `chat_template` to be a string or a list of {name, template}; we take 'default'."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{source}: chat_template must be a string or a list with a 'default' entry")


class Tokenizer:
    """tiktoken ranks 0..n-1, then 256 special ids n..n+255 (`vocab_size` = n + 256)."""

    def __init__(self, ranks: dict[bytes, int], special_names: dict[int, str] | None = None,
                 pattern: str = KIMI_PATTERN, bos_token: str = "[BOS]", eos_token: str = "[EOS]",
                 chat_template: str | None = None, name: str = "kimi"):
        """`special_names` maps offsets 0..255 (after the base ranks) to names; default: K2's names."""
        self.n_base = len(ranks)
        self.vocab_size = self.n_base + NUM_SPECIAL
        names = K2_SPECIAL_NAMES if special_names is None else special_names
        for offset in names:
            if not 0 <= offset < NUM_SPECIAL:
                raise ValueError(f"special token offset {offset} is outside 0..{NUM_SPECIAL - 1}")
        self.special_tokens = {}
        for offset in range(NUM_SPECIAL):
            token_id = self.n_base + offset
            self.special_tokens[names.get(offset) or reserved_name(token_id)] = token_id
        if len(self.special_tokens) != NUM_SPECIAL:
            raise ValueError("special token names must be unique")
        self.id_to_special = {i: s for s, i in self.special_tokens.items()}
        self._all_specials = frozenset(self.special_tokens)
        self._special_starts = "".join(sorted({name[0] for name in self.special_tokens}))
        # Finds special-token names in text; longest first so a name wins over any name it contains.
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        self.special_regex = re.compile("|".join(map(re.escape, by_length)))
        self.pattern = pattern
        self._ranks = ranks
        self.chat_template = chat_template
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self.bos_id = self.special_id(bos_token)
        self.eos_id = self.special_id(eos_token)
        self.im_end_id = self.special_tokens.get("<|im_end|>")
        self.pad_id = self.special_tokens.get("[PAD]")
        # Chat turns end with <|im_end|>; the tokenizer's own eos is [EOS]. Generation stops on both.
        self.stop_ids = sorted({i for i in (self.im_end_id, self.eos_id) if i is not None})

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """Load `tiktoken.model` (+ `tokenizer_config.json`, `chat_template.jinja` if present) from a dir."""
        path = Path(path)
        model_file = path / "tiktoken.model"
        if not model_file.is_file():
            raise ValueError(f"{path}: expected a Kimi tokenizer directory containing tiktoken.model")
        ranks = read_tiktoken_model(model_file)
        n_base = len(ranks)
        config = {}
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        special_names = dict(K2_SPECIAL_NAMES) if "added_tokens_decoder" not in config else {}
        for key, entry in config.get("added_tokens_decoder", {}).items():
            token_id = int(key)
            if not n_base <= token_id < n_base + NUM_SPECIAL:
                raise ValueError(f"{config_file}: added token id {token_id} is outside the special range "
                                 f"{n_base}..{n_base + NUM_SPECIAL - 1} (after {n_base} base ranks)")
            special_names[token_id - n_base] = _token_content(entry, f"added_tokens_decoder[{key}]")
        template = _select_template(config.get("chat_template"), config_file)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(ranks, special_names,
                   bos_token=_token_content(config.get("bos_token"), "bos_token") or "[BOS]",
                   eos_token=_token_content(config.get("eos_token"), "eos_token") or "[EOS]",
                   chat_template=template, name=path.name or "kimi")

    def save_pretrained(self, path, extra_config: dict | None = None) -> None:
        """Write `tiktoken.model` + `tokenizer_config.json` in the layout of the real Kimi files."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_tiktoken_model(path / "tiktoken.model", self._ranks)
        # Tool-call and think markers are not "special" in Kimi's config: they survive skip_special_tokens.
        plain = {"<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                 "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<think>", "</think>"}
        decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": s not in plain}
                   for i, s in sorted(self.id_to_special.items())}
        config = {
            "added_tokens_decoder": decoder,
            "bos_token": self.id_to_special[self.bos_id],
            "eos_token": self.id_to_special[self.eos_id],
            "pad_token": "[PAD]" if self.pad_id is not None else None,
            "unk_token": "[UNK]" if "[UNK]" in self.special_tokens else None,
            "model_max_length": 1_048_576,
            "tokenizer_class": "TikTokenTokenizer",
            **(extra_config or {}),
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template is not None:
            (path / "chat_template.jinja").write_text(self.chat_template)

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; expected one of the {NUM_SPECIAL} names "
                             f"in tokenizer_config.json (e.g. '<|im_end|>')") from None

    def is_special(self, token_id: int) -> bool:
        return self.n_base <= token_id < self.vocab_size

    def encode(self, text: str, allow_special=False) -> list[int]:
        """Text -> ids. `allow_special`: False (special-token text stays text), True or "all" (every
        special name becomes its control id), or a collection of special names to allow."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if allow_special is False:
            allowed = frozenset()
        elif allow_special is True or allow_special == "all":
            allowed = self._all_specials
        else:
            allowed = frozenset(allow_special)
            if not allowed <= self._all_specials:
                raise ValueError(f"allow_special names unknown specials: {sorted(allowed - self._all_specials)}")
        if len(text) > _MAX_RUN_CHARS:
            pieces = split_long_input(text)
            if len(pieces) > 1:
                if allowed or self._special_scan_is_cheap(text):
                    return self._encode_pieces(pieces, allowed)
                return self._encode_pieces_plain(pieces, allowed)
        return self._encode_piece(text, allowed)

    def _encode_piece(self, piece: str, allowed: frozenset) -> list[int]:
        if not allowed:
            return self._enc.encode_ordinary(piece)
        return self._enc.encode(piece, allowed_special=allowed, disallowed_special=())

    def _special_scan_is_cheap(self, text: str) -> bool:
        """Whether `_encode_pieces` pays off for ordinary (no specials allowed) encoding of `text`.

        Its tiktoken call (`encode`, the one with buffer output) also scans for special names, ~0.1 us per
        name found even when none is allowed, where `encode_ordinary` does not scan; the buffer saves ~1.5 ns
        per id, and text has about len/4 ids or more. Every name starts with one of `_special_starts`, so
        their count bounds the names found: the buffer wins while they are rarer than one in 256 characters
        (1 MB of `<|im_end|>` with the buffer: +16% over tiktoken; without: +5%).
        """
        budget = len(text) >> 8
        for c in self._special_starts:
            if c in text:  # memchr; counting only when present
                budget -= text.count(c)
        return budget >= 0

    def _encode_pieces(self, pieces: list[str], allowed: frozenset) -> list[int]:
        """The ids of consecutive pieces as one list, equal to `_encode_pieces_plain`.

        tiktoken hands each piece's ids over as a uint32 buffer; they are appended to one C array and become
        Python ints once, at the end. Extending one list per piece instead costs an incref per id on copy, a
        decref when the piece's list dies, and regrowing the big list: ~1.5 ms per million ids, 7% of
        tiktoken's own time on 1 MB of whitespace. Same regex pieces either way: tiktoken's `encode` with no
        allowed specials splits exactly as `encode_ordinary` does.
        """
        ids = array.array(_UINT32)
        try:
            for piece in pieces:
                piece_ids = self._enc.encode_to_numpy(piece, allowed_special=allowed, disallowed_special=())
                ids.frombytes(memoryview(piece_ids).cast("B"))
        except UnicodeEncodeError:  # lone surrogates: only tiktoken's list methods replace them (per piece)
            return self._encode_pieces_plain(pieces, allowed)
        return ids.tolist()

    def _encode_pieces_plain(self, pieces: list[str], allowed: frozenset) -> list[int]:
        """Reference twin of `_encode_pieces`: one tiktoken list per piece, concatenated."""
        ids = []
        for piece in pieces:
            ids += self._encode_piece(piece, allowed)
        return ids

    def encode_batch(self, texts: list[str], allow_special=False, num_threads: int = 8) -> list[list[int]]:
        """Encode many texts in threads (tiktoken releases the GIL while encoding)."""
        if len(texts) <= 1 or num_threads <= 1:
            return [self.encode(t, allow_special) for t in texts]
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(lambda t: self.encode(t, allow_special), texts))

    def _check_ids(self, ids):
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary 0..{self.vocab_size - 1}")

    def decode(self, ids) -> str:
        """Ids -> text; invalid UTF-8 becomes U+FFFD; special ids decode to their names."""
        ids = list(ids)
        self._check_ids(ids)
        return self._enc.decode(ids)

    def decode_bytes(self, ids) -> bytes:
        ids = list(ids)
        self._check_ids(ids)
        return self._enc.decode_bytes(ids)

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary 0..{self.vocab_size - 1}")
        return self._enc.decode_single_token_bytes(token_id)

    def stream_decoder(self, skip_ids=()) -> "StreamDecoder":
        return StreamDecoder(self, skip_ids)


class StreamDecoder:
    """Feed ids one at a time; get text deltas that never split a UTF-8 sequence.

    The concatenation of every `push` plus the final `flush` equals `tokenizer.decode(ids)` (with the
    `skip_ids` left out): incomplete UTF-8 is held back until it completes, and replaced exactly as a
    one-shot decode would when it cannot.
    """

    def __init__(self, tokenizer: Tokenizer, skip_ids=()):
        self._token_bytes = tokenizer.token_bytes
        self._skip = frozenset(skip_ids)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: anything still pending is an incomplete sequence and becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
