"""bench/optim.py's resumable runs: a finished run under --root is reused instead of retrained, only when it is the
same job, and a run that predates bench_result.json is read back from its metrics.jsonl with its wall time marked
as derived. Real (tiny) training runs through kimi.train.trainer.train; no part is mocked."""

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kimi.train.data import prepare

spec = importlib.util.spec_from_file_location("bench_optim", Path(__file__).resolve().parents[1] / "bench" / "optim.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TINY = {**bench.CONFIG, "hidden_size": 32, "intermediate_size": 64, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "v_head_dim": 8,
        "linear_attn_config": {**bench.CONFIG["linear_attn_config"], "head_dim": 8}}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    g = torch.Generator().manual_seed(0)
    text = "".join(chr(97 + int(i)) for i in torch.randint(0, 8, (6000,), generator=g))
    (d / "text.txt").write_text(text)
    prepare([str(d / "text.txt")], "bytes", str(d / "data"), val_fraction=0.1, progress=False)
    (d / "config.json").write_text(json.dumps(TINY))
    return dict(config=str(d / "config.json"), data=str(d / "data"), tokens=4 * 128, batch_tokens=128, seq_len=32,
                tau=100.0, warmup=1, autocast="none", threads=1, val_points=2)


def job(base, root, **kw):
    return dict(base, root=str(root), **{"optimizer": "muonclip", "lr": 3e-3, "seed": 0, **kw})


def test_finished_run_is_reused_with_its_recorded_summary(base, tmp_path):
    j = job(base, tmp_path)
    assert bench.finished(j) is None
    trained = bench.run_one(j)
    assert not trained["reused"] and not trained["wall_derived"]
    assert (bench.run_dir(j) / bench.RESULT).is_file()
    again = bench.finished(j)
    assert again["reused"]
    for k in ("val_loss", "train_loss", "wall_s", "curve", "max_logit", "steps", "out"):
        assert again[k] == trained[k], k
    assert len(again["curve"]) == 2 and again["steps"] == 4


def test_run_of_another_job_in_the_same_directory_is_refused(base, tmp_path):
    bench.run_one(job(base, tmp_path))
    with pytest.raises(ValueError, match="warmup=1 .expected 2"):
        bench.finished(job(base, tmp_path, warmup=2))
    with pytest.raises(ValueError, match="tokens"):
        bench.finished(job(base, tmp_path, tokens=8 * 128))


def test_bench_result_must_match_the_job(base, tmp_path):
    j = job(base, tmp_path)
    bench.run_one(j)
    path = bench.run_dir(j) / bench.RESULT
    record = json.loads(path.read_text())
    record["job"]["val_points"] = 5
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="val_points=5"):
        bench.finished(j)


def test_run_without_bench_result_is_read_from_metrics_with_derived_wall(base, tmp_path):
    j = job(base, tmp_path, optimizer="adamw")
    trained = bench.run_one(j)
    (bench.run_dir(j) / bench.RESULT).unlink()
    old = bench.finished(j)
    assert old["reused"] and old["wall_derived"]
    assert old["val_loss"] == trained["val_loss"] and old["curve"] == trained["curve"]
    rows = [json.loads(line) for line in (bench.run_dir(j) / "metrics.jsonl").read_text().splitlines()]
    assert old["wall_s"] == pytest.approx(sum(128 / r["tok_s"] for r in rows))
    assert 0 < old["wall_s"] < trained["wall_s"]  # step times only: validation and checkpointing left out


def test_execute_trains_only_what_is_missing_and_keeps_order(base, tmp_path):
    done = job(base, tmp_path, seed=0)
    bench.run_one(done)
    stamp = os.stat(bench.run_dir(done) / "metrics.jsonl").st_mtime_ns
    new = job(base, tmp_path, seed=1)
    with ThreadPoolExecutor(1) as pool:
        results = bench.execute(pool, [new, done])
    assert [r["seed"] for r in results] == [1, 0]
    assert [r["reused"] for r in results] == [False, True]
    assert os.stat(bench.run_dir(done) / "metrics.jsonl").st_mtime_ns == stamp
    assert (bench.run_dir(new) / bench.RESULT).is_file()
