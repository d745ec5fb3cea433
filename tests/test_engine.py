"""The engine against the reference generate (kimi/model/generate.py), token for token, for a K2-style model and a
Kimi Linear hybrid: one request; 32 mixed-length requests; prefix hits vs caching off; chunked prefill with a chunk
smaller than a block and not a multiple of it; preemption; aborts; n > 1; seeded sampling; logprobs; bad input;
and a soak that checks every block and state slot comes back. fp32 throughout, so greedy ties cannot flip.
"""

import collections
import functools
import random

import pytest
import torch

from kimi.engine.engine import LLM, LLMEngine
from kimi.engine.sampling_params import SamplingParams
from kimi.model.generate import generate
from kimi.model.model import build_model
from tests.test_model import k2_tiny, kl_tiny

FAMILIES = {"k2": k2_tiny, "kimi_linear": kl_tiny}
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box idle OpenMP workers cost 10-100x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def model(family):
    return build_model(FAMILIES[family](), dtype=torch.float32, seed=1).eval()


@functools.cache
def reference(family, prompt: tuple, max_new: int) -> list[int]:
    return generate(model(family), list(prompt), max_new)[0]


def prompts(n, lo, hi, seed=0, vocab=96):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def engine(family, **kw):
    kw = {"max_num_seqs": 16, "max_num_batched_tokens": 64, "max_model_len": 128, "block_size": 8, **kw}
    return LLM(model(family), **kw)


def assert_all_free(llm):
    s = llm.stats()
    assert s["blocks_used"] == 0 and s["state_slots_used"] == 0 and s["running"] == 0 and s["waiting"] == 0, s
    assert all(b.ref_count == 0 for b in llm.blocks.blocks)
    assert not llm.requests


@pytest.mark.parametrize("family", FAMILIES)
def test_one_request_matches_reference(family):
    llm = engine(family)
    p = prompts(1, 37, 37)[0]
    out = llm.generate([p], SamplingParams(max_tokens=20, **GREEDY))[0]
    assert out.token_ids == reference(family, tuple(p), 20)
    assert out.finish_reason == "length" and out.num_prompt_tokens == 37 and out.num_completion_tokens == 20
    assert_all_free(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_32_mixed_length_requests_batched_match_reference(family):
    llm = engine(family, max_num_seqs=32, max_num_batched_tokens=256)
    ps = prompts(32, 1, 70, seed=1)
    lens = [random.Random(i).randint(1, 12) for i in range(32)]
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in lens]
    outs = llm.generate(ps, params)
    for p, m, out in zip(ps, lens, outs):
        assert out.token_ids == reference(family, tuple(p), m)
    assert_all_free(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_hits_match_caching_off(family):
    """Earlier requests leave their prompts cached (and, for the hybrid, KDA snapshots at block boundaries); later
    prompts extending them hit that cache and must give exactly the tokens of an engine with caching off."""
    bases = prompts(6, 18, 40, seed=2)
    later = [b + ext for b, ext in zip(bases, prompts(6, 3, 20, seed=3))]
    later += [bases[0][:17] + [5, 6, 7]]  # shares a shorter prefix
    sp = SamplingParams(max_tokens=8, **GREEDY)
    on, off = engine(family), engine(family, enable_prefix_caching=False)
    first_on, first_off = on.generate(bases, sp), off.generate(bases, sp)
    assert [o.token_ids for o in first_on] == [o.token_ids for o in first_off]
    hits_on, hits_off = on.generate(later, sp), off.generate(later, sp)
    assert [o.token_ids for o in hits_on] == [o.token_ids for o in hits_off]
    for p, o in zip(later, hits_on):
        assert o.token_ids == reference(family, tuple(p), 8)
    assert sum(o.num_cached_tokens for o in hits_on) >= 6 * 16
    assert all(o.num_cached_tokens % 8 == 0 for o in hits_on)
    assert sum(o.num_cached_tokens for o in hits_off) == 0
    s = on.stats()
    assert s["prefix_cache_hit_rate"] > 0.25 and s["prefix_cache_hit_tokens"] > 0
    if family == "kimi_linear":
        assert s["snapshots_used"] > 0
    assert_all_free(on)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_with_chunk_smaller_than_a_block(family):
    llm = engine(family, max_num_batched_tokens=5, block_size=8, max_num_seqs=4)
    ps = prompts(4, 20, 45, seed=4)
    outs = llm.generate(ps, SamplingParams(max_tokens=6, **GREEDY))
    for p, o in zip(ps, outs):
        assert o.token_ids == reference(family, tuple(p), 6)
    assert_all_free(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_when_the_cache_is_small(family):
    llm = engine(family, num_blocks=16, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=128)
    ps = prompts(8, 15, 30, seed=5)
    outs = llm.generate(ps, SamplingParams(max_tokens=16, **GREEDY))
    assert llm.stats()["num_preemptions"] > 0
    for p, o in zip(ps, outs):
        assert o.token_ids == reference(family, tuple(p), 16)
    assert_all_free(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_abort_midway_frees_and_others_continue(family):
    llm = engine(family)
    ps = prompts(6, 10, 30, seed=6)
    sp = SamplingParams(max_tokens=12, **GREEDY)
    ids = [llm.add_request(p, sp) for p in ps]
    for _ in range(4):
        llm.step()
    llm.abort(ids[1])
    llm.abort(ids[4])
    final = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                final[out.request_id] = out
    for i, (rid, p) in enumerate(zip(ids, ps)):
        if i in (1, 4):
            assert final[rid].finish_reason == "abort" and len(final[rid].token_ids) < 12
        else:
            assert final[rid].token_ids == reference(family, tuple(p), 12)
    assert_all_free(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_n_samples_share_the_prompt(family):
    llm = engine(family)
    p = prompts(1, 29, 29, seed=7)[0]
    out = llm.generate([p], SamplingParams(n=3, max_tokens=6, **GREEDY))[0]
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    for o in out.outputs:
        assert o.token_ids == reference(family, tuple(p), 6)
    assert llm.stats()["prefix_cache_hit_tokens"] >= 2 * 24  # the siblings reused the prompt's full blocks
    sampled = llm.generate([p], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True))[0]
    assert len({tuple(o.token_ids) for o in sampled.outputs}) > 1
    assert_all_free(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_is_reproducible_and_batch_independent(family):
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234, max_tokens=10, ignore_eos=True)
    p = prompts(1, 12, 12, seed=8)[0]
    alone = engine(family).generate([p], sp)[0].token_ids
    again = engine(family).generate([p], sp)[0].token_ids
    others = prompts(7, 5, 40, seed=9)
    mixed = engine(family).generate(others[:3] + [p] + others[3:],
                                    [SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True)] * 3 + [sp]
                                    + [SamplingParams(temperature=0.5, max_tokens=4, ignore_eos=True)] * 4)[3]
    assert alone == again == mixed.token_ids
    other_seed = engine(family).generate([p], SamplingParams(**{**sp.__dict__, "seed": 99}))[0].token_ids
    assert other_seed != alone


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_are_log_softmax_of_reference_logits(family):
    llm = engine(family)
    p = prompts(1, 15, 15, seed=10)[0]
    out = llm.generate([p], SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=4, ignore_eos=True))[0]
    seq = torch.tensor([p + out.token_ids])
    with torch.no_grad():
        lp = model(family)(seq)[0, len(p) - 1:-1].float().log_softmax(-1)
    assert len(out.logprobs) == 6
    for t, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry["token"] == tok
        assert abs(entry["logprob"] - float(lp[t, tok])) <= 1e-4
        top_ids = [i for i, _ in entry["top"]]
        assert top_ids == lp[t].topk(4).indices.tolist()
        assert max(abs(v - float(lp[t, i])) for i, v in entry["top"]) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_fails_only_that_request(family):
    llm = engine(family, max_model_len=64)
    sp = SamplingParams(max_tokens=5, **GREEDY)
    good = prompts(2, 10, 20, seed=11)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.add_request(list(range(64)), sp)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.add_request([], sp)
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        llm.add_request([3, 96, 4], sp)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.add_request("text without a tokenizer", sp)
    outs = llm.generate([good[0], [1] * 80, [], good[1], [-1]], sp)
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "length", "error"]
    assert "max_model_len" in outs[1].error and "empty" in outs[2].error
    assert outs[0].token_ids == reference(family, tuple(good[0]), 5)
    assert outs[3].token_ids == reference(family, tuple(good[1]), 5)
    assert_all_free(llm)


def test_banned_token_ids_are_never_sampled():
    fam = "k2"
    p = prompts(1, 6, 10, seed=13)[0]
    ref = reference(fam, tuple(p), 8)
    banned = sorted(set(ref[:4]))
    llm = engine(fam)
    out = llm.generate([p], SamplingParams(max_tokens=8, banned_token_ids=banned, **GREEDY))[0]
    assert not set(out.token_ids) & set(banned)
    with torch.no_grad():
        logits = model(fam)(torch.tensor([p]))[0, -1]
    logits[banned] = float("-inf")
    assert out.token_ids[0] == int(logits.argmax())  # the best token that is not banned
    sampled = llm.generate([p] * 4, SamplingParams(max_tokens=16, temperature=1.5, seed=7, banned_token_ids=banned,
                                                   ignore_eos=True))
    assert all(not set(o.token_ids) & set(banned) for o in sampled)


def test_stop_token_ids_min_tokens_and_max_model_len():
    fam = "k2"
    p = prompts(1, 10, 10, seed=12)[0]
    ref = reference(fam, tuple(p), 12)
    llm = engine(fam)
    out = llm.generate([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[ref[3]]))[0]
    first = ref.index(ref[3])
    assert out.finish_reason == "stop" and out.token_ids == ref[:first + 1]
    out = llm.generate([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[ref[0]], min_tokens=3))[0]
    assert ref[0] not in out.token_ids[:3] and len(out.token_ids) >= 3
    short = engine(fam, max_model_len=16)
    out = short.generate([p], SamplingParams(max_tokens=50, **GREEDY))[0]
    assert out.finish_reason == "length" and len(p) + len(out.token_ids) == 16
    assert out.token_ids == ref[:6]


def test_step_log_accounts_for_every_computed_token():
    llm = engine("kimi_linear", max_num_batched_tokens=24)
    ps = prompts(5, 10, 40, seed=3)
    llm.generate(prompts(1, 5, 5, seed=4), SamplingParams(max_tokens=2, **GREEDY))
    assert llm.step_log is None  # off unless asked for
    llm.step_log = collections.deque()
    llm.generate(ps, SamplingParams(max_tokens=6, **GREEDY))
    log = list(llm.step_log)
    # every prompt token, and every output token but the last (it is sampled, never fed back)
    assert sum(single + chunked for *_, single, chunked in log) == sum(map(len, ps)) + 5 * 5
    assert all(0 < single + chunked <= 24 and wall >= 0 and cpu >= 0 for _, wall, cpu, single, chunked in log)
    assert any(single and chunked for *_, single, chunked in log)  # decodes and prefill chunks shared steps


@pytest.mark.parametrize("family", FAMILIES)
def test_soak_every_block_and_slot_comes_back(family):
    soak(family, 150)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_soak_5000_requests(family):
    soak(family, 5000)


def soak(family, num_requests):
    """Random prompt/output lengths, random aborts, a cache small enough to preempt; then everything is free."""
    rng = random.Random(num_requests)
    llm = engine(family, num_blocks=40, max_model_len=96, max_num_seqs=12, max_num_batched_tokens=96, block_size=4)
    live: list[str] = []
    submitted = finished = 0
    while finished < num_requests:
        while submitted < num_requests and len(live) < 24:
            p = [rng.randrange(96) for _ in range(rng.randint(1, 60))]
            if rng.random() < 0.3:  # shared prefixes exercise hits and snapshots
                p = [7] * 16 + p[:40]
            sp = SamplingParams(max_tokens=rng.randint(1, 20), temperature=rng.choice([0, 1.0]), ignore_eos=True,
                                n=rng.choice([1, 1, 1, 2]))
            live.append(llm.add_request(p, sp))
            submitted += 1
        if live and rng.random() < 0.05:
            llm.abort(live[rng.randrange(len(live))])
        for out in llm.step():
            if out.finished:
                live.remove(out.request_id)
                finished += 1
                assert out.finish_reason in ("length", "abort")
        s = llm.stats()
        assert s["blocks_used"] + s["blocks_free"] == s["blocks_total"]
        assert s["snapshots_used"] <= s["snapshots_total"]
    assert_all_free(llm)
    assert llm.blocks.num_free == llm.blocks.num_blocks
    assert llm.runner.states.num_free == llm.runner.states.num_slots
    assert llm.stats()["num_preemptions"] > 0


def test_engine_rejects_a_cache_too_small_for_max_model_len():
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(model("k2"), num_blocks=3, block_size=8, max_model_len=64)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_on_cuda_matches_reference(family):
    m = build_model(FAMILIES[family](), dtype=torch.float32, seed=1, device="cuda").eval()
    llm = LLM(m, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128, block_size=8)
    ps = prompts(8, 5, 50, seed=13)
    outs = llm.generate(ps, SamplingParams(max_tokens=10, **GREEDY))
    for p, o in zip(ps, outs):
        assert o.token_ids == generate(m, p, 10)[0]
    assert_all_free(llm)


class CountdownGuide:
    """Allows only `token`, and ends after `n` of them: the engine must mask, feed back, and finish on it."""

    def __init__(self, token: int, n: int):
        self.token, self.left, self.seen = token, n, []

    def allowed_tokens(self):
        mask = torch.zeros(96, dtype=torch.bool)
        mask[self.token] = True
        return mask

    def accept(self, token_id: int) -> None:
        self.seen.append(token_id)
        self.left -= 1

    def is_finished(self) -> bool:
        return self.left <= 0


def test_guide_masks_sampling_and_finishes_the_request():
    llm = engine("kimi_linear")
    guides = [CountdownGuide(7, 3), CountdownGuide(11, 5)]
    outs = llm.generate(prompts(2, 4, 9), [SamplingParams(temperature=1.0, seed=i, max_tokens=20, guide=g)
                                           for i, g in enumerate(guides)])
    assert [o.outputs[0].token_ids for o in outs] == [[7] * 3, [11] * 5]
    assert [o.finish_reason for o in outs] == ["stop", "stop"] and guides[1].seen == [11] * 5
    with pytest.raises(ValueError, match="guide"):
        SamplingParams(guide=object())
    assert_all_free(llm)
