"""`train_tokenizer(..., split_word_prefix=True)`: a word is the same tokens in prose and in JSON.

Trained on a small mixed prose/JSON corpus in well under a second; the trained vocabulary is used through kimi's
Tokenizer (tiktoken with Kimi's unchanged split pattern), which is what the built-in model sees."""

import json
import random

import pytest
import regex

from kimi.tokenizer.bpe import train_tokenizer
from kimi.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:corpus ran out of merges")

WORDS = ["Kyiv", "Lima", "Accra", "Austin", "Iris", "Anton", "expression", "collection", "weather", "forecast",
         "puzzle", "marble", "violet", "velvet", "Zoe", "Maya", "Wren", "items", "people", "price"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        a, b = rng.sample(WORDS, 2)
        lines.append(f"What is the {a} of {b}? Tell me about ({a}) and '{b}'.")
        lines.append(json.dumps({"city": a, "key": b, "note": f"{a} {b}"}))
    path = tmp_path_factory.mktemp("wp") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "split_word_prefix"])
def tok(request, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(corpus)], 256 + 256 + 300, str(out), split_word_prefix=request.param)
    return request.param, Tokenizer.from_pretrained(out)


def test_word_tokens_do_not_depend_on_what_precedes_them(tok):
    split, t = tok
    differs = [w for w in WORDS for prefix in (" ", '"', "(", "'")
               if t.encode(prefix + w) != t.encode(prefix) + t.encode(w)]
    if split:
        assert differs == []
    else:  # the plain trainer does learn " Kyiv"-style tokens on this corpus: the option is what changes it
        assert len(differs) >= len(WORDS) // 2


def test_no_learned_token_joins_a_prefix_to_a_letter(tok):
    split, t = tok
    pieces = [t.token_bytes(i).decode("utf-8", "replace") for i in range(t.n_base)]
    joined = [p for p in pieces if regex.search(r"[^\r\n\p{L}\p{N}]\p{L}", p)]
    assert (joined == []) == split


def test_round_trip_is_unchanged(tok):
    _, t = tok
    text = 'Weather in "Kyiv" on 2004-11-09? {"city":"Lima","n":3} it\'s Zoe\'s café'
    assert t.decode(t.encode(text)) == text
