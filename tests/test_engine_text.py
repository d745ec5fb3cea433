"""The engine from a real model directory (safetensors + config.json + tiktoken.model): text prompts, text output,
stop strings matched across token boundaries, and the streaming interfaces (iterator, async generator, threads)."""

import asyncio
import threading

import pytest
import torch

from kimi.config import ModelConfig
from kimi.engine.engine import LLM
from kimi.engine.sampling_params import SamplingParams
from kimi.model.generate import generate
from kimi.model.loader import save_model
from kimi.model.model import build_model
from kimi.tokenizer.bpe import train_tokenizer
from tests.test_model import TINY

CORPUS = ("The quick brown fox jumps over the lazy dog. " * 20 + "Pack my box with five dozen liquor jugs! " * 20
          + "How vexingly quick daft zebras jump; 0123456789 " * 20)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("kimi_text_model")
    corpus = out / "corpus.txt"
    corpus.write_text(CORPUS)
    tok = train_tokenizer([str(corpus)], 256 + 257 + 40, str(out))
    cfg = ModelConfig.from_dict({
        "model_type": "kimi_linear", **TINY, "vocab_size": tok.vocab_size, "num_hidden_layers": 4,
        "num_experts": 8, "num_experts_per_token": 2, "eos_token_id": tok.im_end_id,
        "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 16, "num_heads": 4,
                               "short_conv_kernel_size": 4}})
    save_model(build_model(cfg, dtype=torch.float32, seed=3), out)
    return out


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", max_num_seqs=8, max_model_len=256, block_size=8)


def test_text_in_text_out_matches_reference(llm):
    tok = llm.tokenizer
    out = llm.generate("The quick brown fox", SamplingParams(max_tokens=16, temperature=0))[0]
    ids = tok.encode("The quick brown fox")
    assert out.prompt_token_ids == ids and out.prompt == "The quick brown fox"
    assert out.token_ids == generate(llm.model, ids, len(out.token_ids), stop_ids=sorted(llm.stop_ids))[0]
    assert out.text == tok.decode([t for t in out.token_ids if not tok.is_special(t)])


def test_stop_string_across_token_boundaries_is_cut_from_text(llm):
    tok = llm.tokenizer
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, skip_special_tokens=False)
    full = llm.generate("Pack my box", sp)[0]
    pieces = [tok.decode(full.token_ids[:k + 1]) for k in range(len(full.token_ids))]
    k = next(k for k in range(3, len(pieces) - 1) if len(pieces[k]) > len(pieces[k - 1]) > 0
             and len(pieces[k + 1]) > len(pieces[k]))
    b = len(pieces[k])
    stop = full.text[b - 1:b + 1]  # last char of one token's text + first char of the next
    cut = llm.generate("Pack my box", SamplingParams(**{**sp.__dict__, "stop": ["@@never@@", stop]}))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert stop not in cut.text
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]


def test_stream_yields_growing_text_and_finishes(llm):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=["zzzz"])
    outs = list(llm.stream("How vexingly", sp))
    assert outs[-1].finished and outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 12
    texts = [o.text for o in outs]
    assert all(a == b[:len(a)] for a, b in zip(texts, texts[1:]))
    assert [len(o.token_ids) for o in outs] == list(range(1, 13))
    final = llm.generate("How vexingly", sp)[0]
    assert final.text == outs[-1].text and final.token_ids == outs[-1].token_ids


def test_stream_from_threads_and_asyncio_while_closing_one_early(llm):
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = llm.generate(["The lazy dog", "five dozen"], sp)
    results = {}

    def consume(prompt):
        results[prompt] = list(llm.stream(prompt, sp))[-1]

    threads = [threading.Thread(target=consume, args=(p,)) for p in ("The lazy dog", "five dozen")]
    for t in threads:
        t.start()
    early = llm.stream("jumps over", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    next(early)
    early.close()  # the consumer went away: the request is aborted

    async def main():
        return [o async for o in llm.astream("The lazy dog", sp)][-1]

    async_out = asyncio.run(main())
    for t in threads:
        t.join(timeout=60)
    assert results["The lazy dog"].token_ids == want[0].token_ids == async_out.token_ids
    assert results["five dozen"].token_ids == want[1].token_ids
    for _ in range(100):
        if not llm.has_unfinished_requests():
            break
        threading.Event().wait(0.05)
    llm.shutdown()
    s = llm.stats()
    assert s["blocks_used"] == 0 and s["state_slots_used"] == 0 and not llm.requests


def test_generate_cli_streams_the_continuation(model_dir, llm, capsys):
    """`kimi generate --model DIR --prompt TEXT` writes the prompt, then the continuation as it streams, then a
    newline: the same greedy text the engine returns."""
    from kimi.cli import main

    prompt = "Pack my box"
    main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-tokens", "12", "--dtype", "float32"])
    want = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0].text
    assert want and capsys.readouterr().out == prompt + want + "\n"
