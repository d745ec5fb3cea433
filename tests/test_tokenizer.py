"""Tokenizer: file format, special ids, Kimi's split pattern and input chunking, streaming detokeniser,
BPE training. Tokenizers are trained here on a slice of tinyshakespeare (well under a second)."""

import base64
import json
import time
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi.tokenizer.bpe import byte_to_char, train_tokenizer
from kimi.tokenizer.tokenizer import (_ASCII_SPACES, _SPACES, K2_SPECIAL_NAMES, KIMI_PATTERN, NUM_SPECIAL, Tokenizer,
                                      read_tiktoken_model, split_long_input)

SHAKESPEARE = Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"
CORPUS_LINES = ["First Citizen: Before we proceed any further, hear me speak.",
                "Dont't you KNOW? We're 123 miles 45678 away; 世界 café naïve ÉCOLE ǅemal",
                "\tIndented\r\n  spaces   and\n\n\nnewlines!!! ... ---", "ABCdef aBC x́ 東京タワー 2024年",
                "12345678 4567 1 12 123 1234 I'LL we'll IT'S it's 世界世界 "]


def _pseudo_words(n_chars: int) -> str:
    """Seeded word-like text for when ../shared/data is not beside the checkout: enough distinct pairs that a
    1024-entry vocabulary does not run out of merges."""
    import random

    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    text = []
    while sum(map(len, text)) < n_chars:
        text.append(" ".join(rng.choices(words, k=12)).capitalize() + ".\n")
    return "".join(text)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    text = SHAKESPEARE.read_text()[:300_000] if SHAKESPEARE.exists() else _pseudo_words(300_000)
    path.write_text(text + "\n".join(CORPUS_LINES * 50))
    return path


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(corpus)], 1024, str(out))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


text_chars = st.sampled_from(list("aZeé É世界 \n\r\t's S0123!?.,-<|>_\u0301ǅʰ\u00a0\u3000😀"))
texts = st.text(text_chars, max_size=60) | st.text(max_size=40)
# pieces that the trained vocabulary has merges for, so a split in a different place changes the ids
FRAGMENTS = ["123", "4567", "12345678", "Hello", "hello", " the", "DON'T", "don't", "'s", "'S", "'ll", "世界",
             "東京", "\n\n", "  ", "\t", "!!\n", " ...", "x́", "ǅemal", "café", "ÉCOLE", "2024年", " 1", ",\r\n",
             "ABCdef"]
fragment_texts = st.lists(st.sampled_from(FRAGMENTS) | text_chars, max_size=20).map("".join)


def test_trained_files_have_kimi_layout(tok_dir, tok):
    ranks = read_tiktoken_model(tok_dir / "tiktoken.model")
    assert len(ranks) == 1024 - NUM_SPECIAL == tok.n_base
    assert all(bytes([b]) in ranks for b in range(256))
    first = (tok_dir / "tiktoken.model").read_text().splitlines()[0].split()
    assert len(first) == 2 and base64.b64decode(first[0]) in ranks and first[1] == "0"
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert len(decoder) == NUM_SPECIAL and min(map(int, decoder)) == tok.n_base
    assert tok.vocab_size == 1024
    # same names at the same offsets after the base ranks as the real K2 tokenizer (k2.md §6.2)
    base = tok.n_base
    assert tok.special_id("[BOS]") == base == tok.bos_id
    assert tok.eos_id == base + 1 and tok.im_end_id == base + 2
    assert tok.special_id("<|im_system|>") == base + 10 and tok.special_id("<|im_middle|>") == base + 17
    assert tok.special_id("<|tool_calls_section_begin|>") == base + 11
    assert tok.special_id("<think>") == base + 22 and tok.special_id("</think>") == base + 23
    assert tok.pad_id == base + 255 and tok.special_id("[UNK]") == base + 254
    assert tok.id_to_special[base + 5] == f"<|reserved_token_{base + 5}|>"
    assert tok.stop_ids == [base + 1, base + 2]
    assert decoder[str(base + 13)]["special"] is False and decoder[str(base + 2)]["special"] is True


def test_real_k2_config_offsets(tmp_path):
    """A hand-written directory in the real K2 layout: 163584-style ids come from the config."""
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257}
    (tmp_path / "tiktoken.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    named = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 22: "<think>", 255: "[PAD]"}
    decoder = {str(258 + off): {"content": name, "special": True} for off, name in named.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": decoder, "bos_token": {"content": "[BOS]"}, "eos_token": "[EOS]"}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 258 + 256
    assert tok.im_end_id == 260 and tok.special_id("<think>") == 280
    assert tok.id_to_special[259 + 3] == "<|reserved_token_262|>"  # unnamed in the config -> reserved
    assert tok.encode("abcab") == [257, 256]
    assert tok.decode([257, 260]) == "abc<|im_end|>"
    assert tok.chat_template is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "{{ messages[0]['content'] }}"


def test_bad_files_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="tiktoken.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(ValueError, match="no gaps"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nnot base64! 1\n")
    with pytest.raises(ValueError, match="tiktoken.model:2"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n"
                                                     for b in range(256)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"7": {"content": "x"}}}))
    with pytest.raises(ValueError, match="outside the special range"):
        Tokenizer.from_pretrained(tmp_path)


def test_special_tokens_only_when_allowed(tok):
    text = "say <|im_end|> and [EOS] <think>"
    plain = tok.encode(text)
    assert not any(tok.is_special(i) for i in plain) and tok.decode(plain) == text
    allowed = tok.encode(text, allow_special=True)
    assert [i for i in allowed if tok.is_special(i)] == [tok.im_end_id, tok.eos_id, tok.special_id("<think>")]
    assert tok.encode(text, allow_special="all") == allowed
    only = tok.encode(text, allow_special={"[EOS]"})
    assert [i for i in only if tok.is_special(i)] == [tok.eos_id]
    assert tok.decode(allowed) == text
    with pytest.raises(ValueError, match="unknown specials"):
        tok.encode(text, allow_special={"<|nope|>"})
    with pytest.raises(ValueError, match="expects a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(ValueError, match="unknown special token"):
        tok.special_id("<|nope|>")


# Kimi's split rules (k2.md §6.1) spelled independently of kimi's pattern string: the Han exclusion as
# a negative lookahead instead of a set intersection.
_NOT_HAN = r"(?!\p{Han})"
_UP = rf"(?:{_NOT_HAN}[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}])"
_LOW = rf"(?:{_NOT_HAN}[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}])"
_APOS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
REFERENCE_SPLIT = regex.compile("|".join([
    r"\p{Han}+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LOW}+{_APOS}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LOW}*{_APOS}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
]))


@settings(max_examples=200, deadline=None)
@given(texts | fragment_texts)
def test_split_pattern_matches_reference_rules(text):
    """tiktoken with kimi's pattern splits like an independent spelling of Kimi's rules in the `regex`
    module: encoding each reference piece alone gives the same ids as encoding the whole text."""
    tok = _module_tok()
    pieces = REFERENCE_SPLIT.findall(text)
    assert "".join(pieces) == text
    assert regex.findall(KIMI_PATTERN, text, flags=regex.V1) == pieces
    assert tok.encode(text) == [i for p in pieces for i in tok.encode(p)]
    assert tok.decode(tok.encode(text)) == text


_TOK = []


def _module_tok():
    # hypothesis tests cannot take function-scoped fixtures; reuse one trained tokenizer
    if not _TOK:
        import tempfile
        d = tempfile.mkdtemp()
        corpus = Path(d) / "c.txt"
        corpus.write_text(SHAKESPEARE.read_text()[:100_000] + "\n".join(CORPUS_LINES * 50)
                          if SHAKESPEARE.exists() else "\n".join(CORPUS_LINES * 200))
        _TOK.append(train_tokenizer([str(corpus)], 768, d))
    return _TOK[0]


def test_whitespace_table_is_isspace():
    """The long-run splitter finds whitespace with `find` over a table of characters and `lstrip`/`rstrip`;
    both must agree exactly with `str.isspace` (Kimi's per-character test) on every code point."""
    every = [chr(c) for c in range(0x110000)]
    spaces = [ch for ch in every if ch.isspace()]
    assert sorted(_SPACES) == spaces and len(set(_SPACES)) == len(_SPACES)
    assert set(_ASCII_SPACES) == {ch for ch in spaces if ch.isascii()} and _SPACES.startswith(_ASCII_SPACES)
    assert all(not ch.lstrip() and not ch.rstrip() for ch in spaces)
    assert all(ch.lstrip() == ch == ch.rstrip() for ch in every if not ch.isspace())


def _kimi_split_reference(text, max_run, window):
    """Kimi's splitter written plainly: one character at a time, per window."""
    out = []
    for w0 in range(0, len(text), window):
        s = text[w0:w0 + window]
        run, is_space, start = 0, s[0].isspace() if s else False, 0
        for i, ch in enumerate(s):
            if ch.isspace() != is_space:
                run, is_space = 1, ch.isspace()
            else:
                run += 1
                if run > max_run:
                    out.append(s[start:i])
                    start, run = i, 1
        out.append(s[start:])
    return out


# ASCII only (incl. the rare ASCII whitespace), one-byte non-ASCII (\x85, \xa0, é), and wide characters
split_texts = (st.text(st.sampled_from(list("ab \n\u3000")), max_size=80)
               | st.text(st.sampled_from(list("ab \t\x0b\x1c\x1f")), max_size=80)
               | st.text(st.sampled_from(list("aé \x85\xa0\u2028😀")), max_size=80))


@settings(max_examples=400, deadline=None)
@given(split_texts, st.integers(1, 9), st.integers(1, 30))
def test_split_long_input_matches_reference(text, max_run, window):
    got = split_long_input(text, max_run=max_run, window=window)
    assert "".join(got) == text
    if len(text) > max_run:
        assert got == _kimi_split_reference(text, max_run, window)


def test_adversarial_inputs_encode_in_linear_time(tok):
    cases = {"whitespace": " " * 1_000_000, "newlines": "\n \t" * 333_334, "no spaces": "ab" * 50_000,
             "one letter": "x" * 1_000_000}
    for name, text in cases.items():
        pieces = split_long_input(text)
        assert max(map(len, pieces)) <= 25_000 and "".join(pieces) == text, name
        ids = tok.encode(text)
        assert tok.decode(ids) == text, name
        assert ids == [i for p in pieces for i in tok._enc.encode_ordinary(p)], name

    def best(text):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            tok.encode(text)
            times.append(time.perf_counter() - t0)
        return min(times)

    for unit in (" ", "z", "ab"):
        small, large = best(unit * (200_000 // len(unit))), best(unit * (800_000 // len(unit)))
        assert large < 10 * small + 0.05, (unit, small, large)  # 4x input: ~4x time, far from 16x


def _limit_texts():
    """Runs right at Kimi's limits (25,000 / 25,001 / 50,000 / 50,001 characters) of whitespace and of
    non-whitespace, in ASCII, one-byte and wide strings, mixed back to back, inside ordinary text, and
    across the 400k-character window edge."""
    r, w = 25_000, 400_000
    texts = {}
    for n in (r, r + 1, 2 * r, 2 * r + 1):
        texts[f"{n} spaces"] = " " * n
        texts[f"{n} letters"] = "a" * n
        texts[f"{n} tabs in text"] = "x" + "\t" * n + "y"
        texts[f"{n} letters in text"] = "one two " + "q" * n + " three"
    texts["mixed ascii"] = " " * (r + 1) + "b" * (r + 1) + "\x1c\x0b" * (r // 2) + "\n" + "z" * r + "\r\n" * 7
    texts["mixed one-byte"] = "\xa0" * (r + 1) + "é" * (2 * r + 1) + "\x85" * r + "x"
    texts["mixed wide"] = "\u3000" * (2 * r + 1) + "世" * (r + 1) + "😀" * r + " " + "é" * (r + 2)
    texts["ordinary then run"] = "to be or not " * 5_000 + "z" * (r + 1) + " and so on\n" * 4_000
    texts["alternating runs over a window edge"] = ("k" * (r + 1) + "\n" * (r + 1)) * 9
    texts["run across the window edge"] = "w " * ((w - r // 2) // 2) + " " * (r + 10) + "v" * (2 * r + 3)
    texts["one letter over two windows"] = "a" * (w + r + 1)
    return texts


def test_split_at_kimi_limits_matches_reference():
    for name, text in _limit_texts().items():
        assert split_long_input(text) == _kimi_split_reference(text, 25_000, 400_000), name


def test_buffered_encode_equals_plain_twin(tok):
    """`_encode_pieces` (tiktoken buffers gathered in one C array) == `_encode_pieces_plain` (tiktoken lists
    concatenated) on long adversarial inputs, with and without special tokens allowed, and `encode`
    returns the same ids whichever of the two it picks."""
    r = 25_000
    texts = _limit_texts()
    texts["sparse specials"] = ("<|im_end|>" + "a" * (r + 3) + " [EOS] " + " " * (r + 1) + "<think>") * 3
    texts["dense specials"] = "abc " * 10 + "<|im_end|>[EOS]" * 4_000
    for name, text in texts.items():
        pieces = _kimi_split_reference(text, r, 400_000)
        for allow in (False, True, {"[EOS]"}):
            allowed = frozenset() if allow is False else tok._all_specials if allow is True else frozenset(allow)
            plain = tok._encode_pieces_plain(pieces, allowed)
            assert tok._encode_pieces(pieces, allowed) == plain, (name, allow)
            assert tok.encode(text, allow_special=allow) == plain, (name, allow)
        assert tok.decode(plain) == text, name
    assert tok._special_scan_is_cheap(texts["sparse specials"])
    assert not tok._special_scan_is_cheap(texts["dense specials"])


def test_buffered_encode_handles_lone_surrogates(tok):
    """tiktoken's buffer output refuses lone surrogates; its list methods replace them per piece. The fast
    path falls back to the plain one, so ids stay those of Kimi's chunked tiktoken calls."""
    text = "a" * 25_005 + "\ud800" + " " * 25_002 + "\udc00x"
    pieces = split_long_input(text)
    assert len(pieces) > 1
    ids = tok.encode(text)
    assert ids == [i for p in pieces for i in tok._enc.encode_ordinary(p)]
    assert tok.decode(ids) == text.replace("\ud800", "\ufffd").replace("\udc00", "\ufffd")


def test_encode_batch_matches_encode(tok):
    texts = CORPUS_LINES + ["", "<|im_end|> x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, allow_special=True, num_threads=2) == [tok.encode(t, True) for t in texts]


def _byte_ids(tok):
    return {tok.token_bytes(i): i for i in range(tok.n_base) if len(tok.token_bytes(i)) == 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 255).map(lambda b: ("byte", b)), texts.map(lambda t: ("text", t)),
                          st.sampled_from(["<|im_end|>", "<think>", "[BOS]"]).map(lambda s: ("special", s))),
                max_size=12))
def test_stream_decoder_concatenates_to_decode(parts):
    tok = _module_tok()
    byte_ids = _byte_ids(tok)
    ids = []
    for kind, value in parts:
        if kind == "byte":
            ids.append(byte_ids[bytes([value])])
        elif kind == "text":
            ids += tok.encode(value)
        else:
            ids.append(tok.special_id(value))
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tok.decode(ids)
    skip = {tok.special_id("<think>")}
    dec = tok.stream_decoder(skip_ids=skip)
    assert "".join([dec.push(i) for i in ids] + [dec.flush()]) == tok.decode([i for i in ids if i not in skip])


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=50))
def test_stream_decoder_never_splits_utf8(text):
    """Valid text fed one id at a time never produces a replacement character or a split code point."""
    tok = _module_tok()
    ids = []
    for ch in text:  # one byte per id where possible: the hardest case for the decoder
        ids += [_byte_ids(tok)[bytes([b])] for b in ch.encode()]
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text
    assert "".join(deltas) + dec.flush() == text


def test_bpe_training_matches_hf_segmentation(corpus, tok, tmp_path):
    """Ranks converted from the HF trainer reproduce HF's own segmentation on ordinary text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers import Regex

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(KIMI_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train([str(corpus)], trainers.BpeTrainer(vocab_size=1024 - NUM_SPECIAL, min_frequency=2, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    lines = [ln for ln in corpus.read_text().splitlines() if ln][:2000]
    same = sum(hf.encode(ln).ids == tok.encode(ln) for ln in lines)
    assert same >= 0.99 * len(lines)
    assert sorted(byte_to_char().values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_bpe_training_rejects_bad_arguments(corpus, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer([str(corpus)], 300, str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        train_tokenizer([str(tmp_path / "missing.txt")], 1024, str(tmp_path))
    with pytest.raises(ValueError, match="at least one"):
        train_tokenizer([], 1024, str(tmp_path))


def test_save_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.special_tokens == tok.special_tokens and again.vocab_size == tok.vocab_size
    for line in CORPUS_LINES:
        assert again.encode(line) == tok.encode(line)
    assert set(K2_SPECIAL_NAMES.values()) <= set(again.special_tokens)
