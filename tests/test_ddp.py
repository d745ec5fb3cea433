"""Data-parallel training (kimi/train/trainer.py under DDP, gloo on loopback): two processes, each taking half of
every global batch, give the loss trace and final weights of one process taking the whole batch (<= 1e-5), with
MuonClip, whose Newton-Schulz runs on the full all-reduced gradient matrix on every rank (muon.md §4); tau is set
low enough that QK-Clip fires, with its maxima MAX-reduced over the ranks."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from kimi.train import checkpoint as ck
from kimi.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import parse, run_files, trace  # noqa: E402,F401  (run_files is a fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(args)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(run_files, tmp_path):
    extra = ("--steps", "4", "--warmup", "1", "--val-every", "2", "--optimizer", "muonclip", "--qk-clip-tau", "0.5",
             "--autocast", "none")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # 8 rows per step: in two micro-batches of 4 here, one per rank there; the gradient sums then match
        # bit for bit (a + b either way), which matters because Newton-Schulz in bf16 turns a last-bit difference
        # in a gradient into a ~1e-5 difference in the loss two steps later
        train(parse(run_files, tmp_path / "one", *extra, "--micro-batch", "4"))
    finally:
        torch.set_num_threads(before)
    mp.spawn(_rank, args=(2, _free_port(), parse(run_files, tmp_path / "two", *extra)), nprocs=2, join=True)
    one, two = trace(tmp_path / "one"), trace(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a.get("val_loss", 0) - b.get("val_loss", 0)) <= 1e-5
        for name, m in a["max_logits"].items():
            assert abs(m - b["max_logits"][name]) <= 1e-4
    assert any(r["max_logit"] > 0.5 for r in one)  # tau = 0.5: the clip has fired, under DP too
    w1 = load_file(str(ck.latest(tmp_path / "one") / "model.safetensors"))
    w2 = load_file(str(ck.latest(tmp_path / "two") / "model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=1e-4, msg=name)
