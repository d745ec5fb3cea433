"""Data pipeline (kimi/train/data.py) and packed documents (kimi/train/packing.py): prepare writes exactly the
tokenised documents (EOS-separated text, chat with its assistant-only mask) with a tail validation split,
deterministically; the loader is deterministic, resumable and splits a global batch across ranks; packed rows
give every document the logits (and QK-Clip maxima) it gets when run alone."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from kimi.model.model import build_model
from kimi.tokenizer.chat import render_ids
from kimi.tokenizer.tokenizer import Tokenizer
from kimi.train.data import IGNORE, Loader, Split, eval_batches, make_batch, prepare, prepare_main
from kimi.train.packing import Documents, packed_forward

sys.path.insert(0, str(Path(__file__).parent))
from test_model import k2_tiny, kl_tiny  # noqa: E402

CHATS = [
    {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, friend"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}],
     "tools": [{"type": "function", "function": {"name": "add", "description": "add", "parameters": {
         "type": "object", "properties": {"a": {"type": "number"}}}}}]},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A byte-level Kimi tokenizer (256 ranks + 256 specials), written like a real one."""
    d = tmp_path_factory.mktemp("tok")
    Tokenizer({bytes([i]): i for i in range(256)}).save_pretrained(d)
    return d


def _inputs(tmp_path):
    (tmp_path / "a.txt").write_text("First document, plain text.\n" * 3)
    (tmp_path / "b.txt").write_text("Second one: más texto ü.")
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return [str(tmp_path / f) for f in ("a.txt", "b.txt", "chat.jsonl")]


def _stream(d, name):
    s = Split(d, name)
    tokens, mask, docs = s.read(0, s.num_tokens)
    return tokens, mask, s.starts


def test_prepare_writes_documents_masks_and_a_tail_validation_split(tmp_path, tok_dir):
    files = _inputs(tmp_path)
    m = prepare(files, str(tok_dir), str(tmp_path / "out"), val_fraction=0.2, shard_tokens=50, progress=False)
    tok = Tokenizer.from_pretrained(tok_dir)
    docs = [tok.encode(Path(f).read_text()) + [tok.eos_id] for f in files[:2]]
    masks = [[1] * len(d) for d in docs]
    for c in CHATS:
        ids, mask = render_ids(c["messages"], tok, tools=c.get("tools"))
        docs.append(ids)
        masks.append(mask)
    want, want_mask = np.concatenate(docs), np.concatenate(masks).astype(bool)
    tr, tr_mask, tr_starts = _stream(tmp_path / "out", "train")
    va, va_mask, va_starts = _stream(tmp_path / "out", "val")
    assert len(m["splits"]["train"]["shards"]) > 1  # shards are read back as one stream
    np.testing.assert_array_equal(np.concatenate([tr, va]), want)
    np.testing.assert_array_equal(np.concatenate([tr_mask, va_mask]), want_mask)
    assert len(va) == round(0.2 * len(want))
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    np.testing.assert_array_equal(tr_starts, starts[starts < len(tr)])
    assert va_starts[0] == 0 and set((starts[starts >= len(tr)] - len(tr)).tolist()) <= set(va_starts.tolist())
    assert 0 < want_mask[starts[2]:].mean() < 1  # chat: only assistant tokens are targets
    assert m["tokenizer"]["vocab_size"] == 512 and m["dtype"] == "uint16"
    again = prepare(files, str(tok_dir), str(tmp_path / "out2"), val_fraction=0.2, shard_tokens=50, progress=False)
    for f in sorted((tmp_path / "out").rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "out2" / f.relative_to(tmp_path / "out")).read_bytes(), f
    assert again["splits"] == m["splits"]


def test_prepare_cli_bytes_and_separator(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("one@@two@@three")
    prepare_main(Namespace(input=[str(tmp_path / "t.txt")], tokenizer="bytes", out=str(tmp_path / "o"),
                           val_fraction=0.0, doc_separator="@@", shard_tokens=1 << 20, no_progress=True))
    assert "train: 11 tokens, 3 documents" in capsys.readouterr().out
    tokens, _, starts = _stream(tmp_path / "o", "train")
    assert bytes(tokens.tolist()) == b"onetwothree" and starts.tolist() == [0, 3, 6]


def test_prepare_rejects_bad_input(tmp_path, tok_dir):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no tokens"):
        prepare([str(tmp_path / "empty.txt")], "bytes", str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="not found"):
        prepare([str(tmp_path / "missing.txt")], "bytes", str(tmp_path / "o"), progress=False)
    (tmp_path / "bad.jsonl").write_text(json.dumps(CHATS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        prepare([str(tmp_path / "bad.jsonl")], str(tok_dir), str(tmp_path / "o"), progress=False)
    (tmp_path / "nomsg.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="messages"):
        prepare([str(tmp_path / "nomsg.jsonl")], str(tok_dir), str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="Kimi tokenizer"):
        prepare([str(tmp_path / "nomsg.jsonl")], "bytes", str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="manifest"):
        Split(tmp_path, "train")


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    text = "@@".join("".join(rng.choice(list("abcdefgh "), size=n)) for n in rng.integers(5, 60, size=40))
    (tmp_path / "c.txt").write_text(text)
    prepare([str(tmp_path / "c.txt")], "bytes", str(tmp_path / "d"), val_fraction=0.1, separator="@@", progress=False)
    split = Split(tmp_path / "d", "train")
    split.dir = tmp_path / "d"
    return split


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_is_deterministic_resumable_and_splits_the_global_batch_across_ranks(corpus):
    T = 16
    a = _batches(Loader(corpus, T, 4, seed=3), 30)  # several epochs
    b = _batches(Loader(corpus, T, 4, seed=3), 30)
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets) for x, y in zip(a, b))
    assert not torch.equal(a[0].input_ids, _batches(Loader(corpus, T, 4, seed=4), 1)[0].input_ids)
    first = Loader(corpus, T, 4, seed=3)
    _batches(first, 17)
    resumed = Loader(corpus, T, 4, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for x, y in zip(a[17:], _batches(resumed, 13)):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.doc_ids, y.doc_ids)
    ranks = [_batches(Loader(corpus, T, 2, seed=3, rank=r, world=2), 30) for r in range(2)]
    for whole, r0, r1 in zip(a, *ranks):
        assert torch.equal(whole.input_ids, torch.cat([r0.input_ids, r1.input_ids]))
    with pytest.raises(ValueError, match="global_rows"):
        Loader(corpus, T, 3, seed=3).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="seq-len"):
        Loader(corpus, corpus.num_tokens, 1)


def test_one_epoch_covers_the_stream_once_and_targets_stay_inside_documents(corpus):
    T = 16
    loader = Loader(corpus, T, 1, seed=0)
    n = len(loader._epoch_windows(0))
    starts = sorted(int(s) for s in loader._epoch_windows(0))
    assert np.all(np.diff(starts) == T) and starts[-1] + T + 1 <= corpus.num_tokens  # a grid, no overlap
    tokens, _, docs = corpus.read(0, corpus.num_tokens)
    for batch in _batches(loader, n):
        ids, tg, doc = batch.input_ids[0], batch.targets[0], batch.doc_ids[0]
        s = int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(tokens, T)
                               .__eq__(ids.numpy()).all(1))[0])
        cross = docs[s + 1:s + T + 1] != docs[s:s + T]
        assert torch.equal(tg == IGNORE, torch.from_numpy(cross))
        assert torch.equal(tg[~torch.from_numpy(cross)], torch.from_numpy(tokens[s + 1:s + T + 1][~cross]))
    assert loader.epoch == 1 and loader.cursor == 0
    val = Split(corpus.dir, "val")
    assert sum(b.input_ids.numel() for b in eval_batches(val, 8, 3)) == 8 * ((val.num_tokens - 1) // 8)


@pytest.mark.parametrize("family", [kl_tiny, k2_tiny], ids=["kimi_linear", "k2"])
def test_packed_rows_equal_documents_run_one_by_one(family):
    """Logits and the recorded QK-Clip maxima of packed rows equal each document's own forward."""
    torch.manual_seed(0)
    model = build_model(family(), dtype=torch.float32).train()
    mlas = [m for m in model.modules() if hasattr(m, "record_max_logits")]
    for m in mlas:
        m.record_max_logits = True
    ids = torch.randint(0, 96, (2, 70))
    doc = torch.tensor([[0] * 20 + [1] * 35 + [2] * 15, [3] * 5 + [4] * 65])  # row 1 starts mid-document
    with torch.no_grad():
        out = packed_forward(model, ids, doc)
        packed_max = [m.max_logits.clone() for m in mlas]
        for m in mlas:
            m.max_logits = None
        pieces = [(0, 0, 20), (0, 20, 55), (0, 55, 70), (1, 0, 5), (1, 5, 70)]
        ref = {(r, a): model(ids[r:r + 1, a:b]) for r, a, b in pieces}
        alone_max = [m.max_logits for m in mlas]
    for r, a, b in pieces:
        torch.testing.assert_close(out[r:r + 1, a:b], ref[(r, a)], atol=2e-5, rtol=1e-5)
    for p, q in zip(packed_max, alone_max):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    # without isolation the second document would see the first: the outputs must differ
    assert (model(ids[:1, :55])[:, 20:] - ref[(0, 20)]).abs().max() > 1e-3


def test_documents_context_layout():
    docs = Documents(torch.tensor([[7, 7, 8, 8, 8], [9, 9, 9, 9, 9]]))
    assert docs.cu_seqlens.tolist() == [0, 2, 5, 10]
    assert docs.positions.tolist() == [[0, 1, 0, 1, 2, 0, 1, 2, 3, 4]]
    assert docs.bounds == [0, 2, 5, 10] and not docs.trivial
    assert Documents(torch.zeros(3, 4, dtype=torch.long)).trivial


def test_all_tokens_trains_on_what_the_mask_leaves_out(tmp_path, tok_dir):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS * 8))
    prepare([str(tmp_path / "chat.jsonl")], str(tok_dir), str(tmp_path / "d"), val_fraction=0.0, progress=False)
    split = Split(tmp_path / "d", "train")
    masked, every = (next(Loader(split, 256, 4, seed=1, all_tokens=a)) for a in (False, True))
    assert torch.equal(masked.input_ids, every.input_ids)
    same_doc = every.doc_ids[:, 1:] == every.doc_ids[:, :-1]
    assert torch.equal(every.targets[:, :-1] != IGNORE, same_doc)  # every next token inside a document
    kept = masked.targets != IGNORE
    assert 0 < kept.sum() < (every.targets != IGNORE).sum()
    assert torch.equal(masked.targets[kept], every.targets[kept])


def test_whole_documents_drops_only_the_targets_of_a_document_begun_before_its_row(corpus):
    T = 32
    at_start, inside = int(corpus.starts[3]), int(corpus.starts[3]) + 2  # a row opening at / inside document 3
    plain = make_batch(corpus, [at_start, inside], T)
    whole = make_batch(corpus, [at_start, inside], T, whole_documents=True)
    assert torch.equal(plain.input_ids, whole.input_ids) and torch.equal(plain.doc_ids, whole.doc_ids)
    assert torch.equal(whole.targets[0], plain.targets[0])
    head = plain.doc_ids[1] == plain.doc_ids[1, 0]
    assert head.any() and (~head).any() and (plain.targets[1][head] != IGNORE).any()
    assert torch.equal(whole.targets[1], torch.where(head, IGNORE, plain.targets[1]))
    # the loader's rows get the same treatment
    a, b = next(Loader(corpus, T, 4, seed=2)), next(Loader(corpus, T, 4, seed=2, whole_documents=True))
    assert torch.equal(a.input_ids, b.input_ids) and (b.targets != IGNORE).sum() < (a.targets != IGNORE).sum()
    # and so do the validation batches: validation counts the targets training does
    for flags in ({}, {"whole_documents": True}, {"all_tokens": True}):
        for k, b in enumerate(eval_batches(corpus, T, 2, **flags)):  # batch k holds windows 2k, 2k+1
            twin = make_batch(corpus, [T * w for w in range(2 * k, 2 * k + len(b.input_ids))], T, **flags)
            assert torch.equal(b.targets, twin.targets)
    counts = [sum(int((b.targets != IGNORE).sum()) for b in eval_batches(corpus, T, 2, whole_documents=w))
              for w in (False, True)]
    assert counts[1] < counts[0]
