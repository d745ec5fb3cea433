"""The trainer (kimi/train/trainer.py) and its checkpoints (kimi/train/checkpoint.py): an interrupted run resumed
from its checkpoint gives the uninterrupted run's loss trace bit for bit on CPU; gradient accumulation does not
change the update; checkpoints are HF-layout model directories that kimi.load_model and transformers load, and a
half-written one is never picked up; bad input fails before training with a message naming the problem."""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from kimi.train import checkpoint as ck
from kimi.train.data import prepare
from kimi.train.trainer import add_train_arguments, lr_factor, train

TINY = {"model_type": "kimi_linear", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_attention_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_token": 2,
        "first_k_dense_replace": 1, "routed_scaling_factor": 2.446, "initializer_range": 0.05,
        "torch_dtype": "float32",
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # a byte vocabulary has no special ids
        "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 16, "num_heads": 4,
                               "short_conv_kernel_size": 4}}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one intra-op thread is faster and deterministic run to run
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
            for n in torch.randint(3, 40, (120,), generator=g)]
    (d / "text.txt").write_text("\n\n".join(docs))
    prepare([str(d / "text.txt")], "bytes", str(d / "data"), val_fraction=0.1, separator="\n\n", progress=False)
    (d / "config.json").write_text(json.dumps(TINY))
    return d


def parse(run_files, out, *extra):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p.parse_args(["--model-config", str(run_files / "config.json"), "--data", str(run_files / "data"),
                         "--out", str(out), "--steps", "6", "--batch-tokens", "256", "--seq-len", "32",
                         "--lr", "3e-3", "--warmup", "2", "--val-every", "3", "--val-tokens", "256",
                         "--no-progress", "--threads", "1", *extra])


def trace(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_a_bf16_model_config(run_files, tmp_path):
    """The checkpoint holds fp32 master weights (its config says float32); the run's own config may say bfloat16."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "torch_dtype": "bfloat16"}))
    args = parse(run_files, tmp_path / "run", "--stop-after", "2", "--steps", "3")
    args.model_config = str(tmp_path / "config.json")
    train(args)
    args.resume, args.stop_after = True, 0
    assert train(args)["steps"] == 3
    assert [r["step"] for r in trace(tmp_path / "run")] == [1, 2, 3]


def test_resume_continues_bit_for_bit(run_files, tmp_path):
    extra = ("--micro-batch", "4", "--schedule", "wsd", "--save-every", "2")
    train(parse(run_files, tmp_path / "whole", *extra))
    train(parse(run_files, tmp_path / "cut", *extra, "--stop-after", "3"))
    assert [c.name for c in ck.checkpoints(tmp_path / "cut")] == ["step-000002", "step-000003"]
    train(parse(run_files, tmp_path / "cut", *extra, "--resume"))
    whole, cut = trace(tmp_path / "whole"), trace(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 7))
    for a, b in zip(whole, cut):
        assert (a["loss"], a.get("val_loss"), a["max_logits"]) == (b["loss"], b.get("val_loss"), b["max_logits"])
    assert whole[-1]["loss"] < whole[0]["loss"]
    a = ck.latest(tmp_path / "whole") / "model.safetensors"
    b = ck.latest(tmp_path / "cut") / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    # --init-from a trained checkpoint (its config.json is the model config): starts where that run ended
    args = parse(run_files, tmp_path / "init", "--init-from", str(a.parent), "--steps", "1", "--warmup", "0")
    args.model_config = None
    train(args)
    assert trace(tmp_path / "init")[0]["loss"] < (whole[0]["loss"] + whole[-1]["loss"]) / 2


def test_gradient_accumulation_and_autocast(run_files, tmp_path):
    # AdamW: Muon's bf16 Newton-Schulz would magnify the last-bit differences of a differently ordered sum
    plain = ("--autocast", "none", "--steps", "3", "--optimizer", "adamw")
    train(parse(run_files, tmp_path / "full", *plain))
    train(parse(run_files, tmp_path / "accum", *plain, "--micro-batch", "2"))
    for a, b in zip(trace(tmp_path / "full"), trace(tmp_path / "accum")):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
    train(parse(run_files, tmp_path / "bf16", "--autocast", "bf16", "--steps", "3"))
    bf16 = trace(tmp_path / "bf16")
    assert all(math.isfinite(r["loss"]) for r in bf16)
    assert abs(bf16[0]["loss"] - trace(tmp_path / "full")[0]["loss"]) < 0.05  # same model, bf16 rounding only
    row = bf16[-1]
    assert set(row) >= {"loss", "lr", "tok_s", "grad_norm", "max_logit", "max_logits", "val_loss"}
    assert list(row["max_logits"]) == ["model.layers.3.self_attn"]  # the MLA layer; KDA has no softmax logits


def test_checkpoint_is_a_model_directory_for_kimi_and_transformers(run_files, tmp_path):
    from kimi.model.loader import load_model

    train(parse(run_files, tmp_path / "run", "--steps", "2", "--optimizer", "adamw"))
    ckpt = ck.latest(tmp_path / "run")
    model = load_model(ckpt, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        ours = model(ids)
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_half_written_checkpoint_is_ignored_and_old_ones_pruned(run_files, tmp_path):
    out = tmp_path / "run"
    train(parse(run_files, out, "--steps", "4", "--save-every", "1", "--keep", "2", "--val-every", "0"))
    assert [c.name for c in ck.checkpoints(out)] == ["step-000003", "step-000004"]
    # a kill during a save leaves a temp dir, or a step dir whose trainer state was never written
    (out / ".tmp-step-000005-123").mkdir()
    (out / "step-000006").mkdir()
    (out / "step-000006" / "config.json").write_text("{}")
    assert ck.latest(out).name == "step-000004"
    state = ck.read_state(ck.latest(out))
    assert state["step"] == 4 and state["data"]["global_rows"] == 8


def _expect(run_files, tmp_path, match, *extra, config=None, data=None):
    args = parse(run_files, tmp_path / "bad", *extra)
    if config is not None:
        (tmp_path / "cfg.json").write_text(json.dumps(config))
        args.model_config = str(tmp_path / "cfg.json")
    if data is not None:
        args.data = data
    with pytest.raises(ValueError, match=match):
        train(args)
    assert not any((tmp_path / "bad").glob("step-*"))


def test_bad_input_fails_before_training(run_files, tmp_path):
    _expect(run_files, tmp_path, "vocab_size 128 is smaller than the data's tokenizer vocabulary 256",
            config={**TINY, "vocab_size": 128})
    _expect(run_files, tmp_path, "larger than the training data", "--seq-len", "100000", "--batch-tokens", "100000")
    _expect(run_files, tmp_path, "multiple of --seq-len", "--batch-tokens", "100")
    _expect(run_files, tmp_path, "no manifest.json", data=str(tmp_path))
    chat_only_prompts = tmp_path / "empty"
    (tmp_path / "x.txt").write_text("x" * 100)
    prepare([str(tmp_path / "x.txt")], "bytes", str(chat_only_prompts), progress=False)
    manifest = json.loads((chat_only_prompts / "manifest.json").read_text())
    manifest["splits"]["train"]["target_tokens"] = 0  # what a chat file without assistant turns produces
    (chat_only_prompts / "manifest.json").write_text(json.dumps(manifest))
    _expect(run_files, tmp_path, "no target tokens", data=str(chat_only_prompts))
    # a resume directory that holds a different model
    train(parse(run_files, tmp_path / "other", "--steps", "1", "--warmup", "0", "--val-every", "0"))
    args = parse(run_files, tmp_path / "other", "--resume")
    (tmp_path / "wide.json").write_text(json.dumps({**TINY, "intermediate_size": 128}))
    args.model_config = str(tmp_path / "wide.json")
    with pytest.raises(ValueError, match="different model than --model-config: intermediate_size"):
        train(args)
    with pytest.raises(ValueError, match="--resume"):
        train(parse(run_files, tmp_path / "other"))
    with pytest.raises(ValueError, match="trained with --optimizer muonclip"):
        train(parse(run_files, tmp_path / "other", "--resume", "--optimizer", "adamw"))


def test_lr_schedules():
    cos = [lr_factor(s, 100, 10, "cosine", 0.1, 0.2) for s in range(1, 101)]
    assert cos[0] == 0.1 and cos[9] == 1.0 and math.isclose(cos[-1], 0.1) and all(a >= b for a, b in
                                                                                   zip(cos[9:], cos[10:]))
    wsd = [lr_factor(s, 100, 10, "wsd", 0.0, 0.2) for s in range(1, 101)]
    assert wsd[9:80] == [1.0] * 71 and wsd[-1] == 0.0 and math.isclose(wsd[89], 0.5)


def test_plot_writes_pngs(run_files, tmp_path):
    pytest.importorskip("matplotlib")
    from kimi.train.plot import plot_run

    train(parse(run_files, tmp_path / "run", "--steps", "3", "--val-every", "1"))
    files = plot_run(tmp_path / "run")
    assert [f.name for f in files] == ["loss.png", "max_logit.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)
