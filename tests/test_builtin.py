"""The shipped built-in model: its directory is a complete HF-layout model within the size budget, and it really
calls tools, closed-loop and greedy through the engine, tokenizer, renderer and parser, on held-out in-distribution
toolverse episodes. A regression anywhere on that path shows up here."""

import json
from collections import Counter

import pytest

from kimi.builtin import MODEL_DIR, builtin_model_dir

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="no built-in model shipped")

N_EPISODES = 50


def test_layout_and_size():
    d = builtin_model_dir()
    for name in ("config.json", "generation_config.json", "tiktoken.model", "tokenizer_config.json"):
        assert (d / name).is_file(), name
    weights = list(d.glob("*.safetensors"))
    assert weights
    assert sum(p.stat().st_size for p in d.iterdir() if p.is_file()) <= 20 << 20
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "kimi_linear"
    lin = cfg["linear_attn_config"]
    assert len(lin["kda_layers"]) == 3 * len(lin["full_attn_layers"])  # KDA:MLA 3:1
    assert cfg["num_experts"] > 1


def test_builtin_model_calls_tools_closed_loop():
    import torch

    from kimi.data.synth import episode
    from kimi.eval.toolverse import EngineBackend, closed_loop, summarize

    torch.set_num_threads(2)
    backend = EngineBackend(builtin_model_dir(), dtype="float32", max_tokens=96)
    episodes = [episode("iid", i) for i in range(N_EPISODES)]
    stats = closed_loop(backend, episodes)
    m = summarize(None, sum(stats.values(), Counter()))
    assert m["cl_parse"] >= 0.98, m
    assert m["cl_json"] >= 0.98, m
    assert m["success"] >= 0.9, m


def test_no_tools_declared_means_a_text_reply():
    """Every training episode declares tools, so with none declared the model still opens a tool call (greedy, for
    "hi": functions.convert); the server (tool_choice "none", the default without tools) bans the tokens that
    open one, and the reply is text."""
    import torch

    from kimi.engine.engine import LLMEngine
    from kimi.engine.sampling_params import SamplingParams
    from kimi.server.protocol import ChatCompletionRequest
    from kimi.server.serving_chat import plan_chat
    from kimi.tokenizer.parser import parse, tool_call_opening_ids

    torch.set_num_threads(2)
    eng = LLMEngine(builtin_model_dir(), dtype="float32", max_num_seqs=2)
    tok = eng.tokenizer
    req = ChatCompletionRequest(model="kimi", messages=[{"role": "user", "content": "hi"}],
                                temperature=0, max_tokens=48)
    plan = plan_chat(req, tok, eng.max_model_len, None, {})
    opening = set(tool_call_opening_ids(tok))
    assert set(plan.params[0].banned_token_ids) == opening != set()
    free = SamplingParams(temperature=0, max_tokens=48)

    def reply(params):
        out = list(eng.stream(plan.prompt_ids, params))[-1]
        return out.token_ids, parse(out.token_ids, tok)

    ids, _ = reply(free)
    assert set(ids) & opening, "the unconstrained model no longer opens a call here: this test lost its point"
    ids, parsed = reply(plan.params[0])
    assert not set(ids) & opening and not parsed.tool_calls and parsed.content.strip()
    eng.shutdown()


def test_chat_cli_runs_the_builtin_model_through_the_server_path():
    """`kimi chat --model DIR` in a pipe: plan_chat -> engine -> ChoiceState, as the server does: a text reply (no
    tools declared, so no call can open), and a reply that cannot fit the window is the server's error, after which
    the chat goes on."""
    import argparse
    import io

    from kimi.chat_cli import add_chat_arguments, chat_main

    p = argparse.ArgumentParser()
    add_chat_arguments(p)
    out = io.StringIO()
    chat_main(p.parse_args(["--model", str(builtin_model_dir()), "--temperature", "0", "--max-tokens", "24"]),
              stdin=io.StringIO("hi\n"), stdout=out)
    text = out.getvalue()
    assert text.strip() and "[error]" not in text and "[tool call" not in text, text
    out = io.StringIO()
    chat_main(p.parse_args(["--model", str(builtin_model_dir()), "--temperature", "0", "--max-tokens", "60",
                            "--max-model-len", "64"]), stdin=io.StringIO("hi\nhello\n"), stdout=out)
    assert out.getvalue().count("[error] This model's maximum context length is 64 tokens") == 2, out.getvalue()
