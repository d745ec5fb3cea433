"""Scheduler on CPU without a model: token budget, running-first order, chunked prefill and its block alignment
for hybrid models, preemption, admission limits, finish/abort freeing everything."""

import torch

from kimi.engine.block_manager import BlockManager
from kimi.engine.sampling_params import SamplingParams
from kimi.engine.scheduler import Scheduler
from kimi.engine.sequence import Sequence, SequenceStatus
from kimi.engine.state_pool import StatePool
from tests.test_model import k2_tiny, kl_tiny


def make(num_blocks=64, block_size=4, max_seqs=4, budget=16, hybrid=False, caching=True, max_len=64):
    cfg = kl_tiny() if hybrid else k2_tiny()
    pool = StatePool(cfg, max_seqs, 8 if hybrid and caching else 0, torch.float32)
    return Scheduler(BlockManager(num_blocks, block_size, caching), pool, max_seqs, budget, max_len)


def seq(n, max_tokens=8, start=0):
    return Sequence("r", 0, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, temperature=0),
                    torch.Generator())


def finish_step(sch, scheduled, token=1):
    """Pretend the model ran: every sequence that completed gets `token`."""
    sampled = {s.seq_id: token for s, n in scheduled if s.num_computed_tokens + n == s.num_tokens}
    return sch.postprocess(scheduled, sampled, frozenset())


def test_budget_running_first_then_waiting_with_chunking():
    sch = make(budget=10)
    a, b = seq(7), seq(6)
    sch.add(a)
    sch.add(b)
    step = sch.schedule()
    assert [(s, n) for s, n in step] == [(a, 7), (b, 3)]  # b's prefill is chunked to the budget left
    finish_step(sch, step)
    step = sch.schedule()
    assert [(s, n) for s, n in step] == [(a, 1), (b, 3)]  # a decodes, b finishes its prompt
    finish_step(sch, step)
    assert a.num_output_tokens == 2 and b.num_output_tokens == 1


def test_max_num_seqs_limits_admission():
    sch = make(max_seqs=2, budget=100)
    seqs = [seq(3, start=10 * i) for i in range(3)]
    for s in seqs:
        sch.add(s)
    step = sch.schedule()
    assert [s for s, _ in step] == seqs[:2] and seqs[2].status is SequenceStatus.WAITING


def test_hybrid_chunks_end_on_block_boundaries():
    sch = make(block_size=4, budget=10, hybrid=True)
    a = seq(23)
    sch.add(a)
    ends = []
    while a.num_computed_tokens < a.num_prompt_tokens:
        step = sch.schedule()
        finish_step(sch, step)
        ends.append(a.num_computed_tokens)
    # non-final chunks end on multiples of 4; the last boundary before the final token (20) is a cut
    assert ends == [8, 16, 20, 23]
    assert len(sch.states.snapshots) == 3  # at 8, 16 and 20


def test_small_budget_below_block_size_still_progresses():
    sch = make(block_size=8, budget=5, hybrid=True)
    a = seq(20)
    sch.add(a)
    ends = []
    while a.num_computed_tokens < a.num_prompt_tokens:
        finish_step(sch, sch.schedule())
        ends.append(a.num_computed_tokens)
    assert ends == [5, 8, 13, 16, 20]


def test_preemption_frees_and_requeues_the_newest():
    sch = make(num_blocks=6, block_size=4, budget=64, max_len=16)
    a, b = seq(8, max_tokens=20, start=0), seq(8, max_tokens=20, start=100)
    sch.add(a)
    sch.add(b)
    for _ in range(40):
        step = sch.schedule()
        if not step:
            break
        finish_step(sch, step)
        if sch.num_preemptions:
            break
    assert sch.num_preemptions >= 1
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sch.waiting[0] is b


def test_finish_and_abort_release_everything():
    sch = make(hybrid=True)
    seqs = [seq(9, start=20 * i) for i in range(3)]
    for s in seqs:
        sch.add(s)
    finish_step(sch, sch.schedule())
    sch.finish(seqs[0], "abort")
    sch.finish(seqs[1], "abort")
    while sch.has_work():
        finish_step(sch, sch.schedule())
    assert seqs[2].finish_reason == "length" and seqs[2].num_output_tokens == 8
    assert sch.blocks.num_used == 0 and sch.states.num_used == 0
    assert all(s.finished for s in seqs)
