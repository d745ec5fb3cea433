"""Batched sampling (kimi/ops/sampling.py) against its per-row reference twins; SamplingParams validation."""

import pytest
import torch

from kimi.engine.sampling_params import SamplingParams
from kimi.ops import sampling


def test_filter_probs_matches_per_row_reference():
    torch.manual_seed(0)
    B, V = 6, 50
    logits = torch.randn(B, V) * 3
    temp = torch.tensor([1.0, 0.7, 1.3, 1.0, 2.0, 0.5])
    top_k = torch.tensor([0, 5, 0, 12, 3, 0])
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.5, 0.9, 0.3])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.05])
    probs, ids = sampling.filter_probs(logits, temp, top_k, top_p, min_p)
    full = torch.zeros(B, V, dtype=probs.dtype).scatter_(1, ids, probs)
    for b in range(B):
        want = sampling.filter_probs_reference(logits[b], float(temp[b]), int(top_k[b]), float(top_p[b]),
                                               float(min_p[b]))
        assert torch.allclose(full[b].double(), want, atol=1e-6), b
        assert (want > 0).sum() >= 1


def test_all_rows_top_k_uses_topk_path():
    logits = torch.randn(3, 40)
    k = torch.tensor([2, 7, 4])
    probs, ids = sampling.filter_probs(logits, torch.ones(3), k, torch.ones(3), torch.zeros(3))
    assert probs.shape == (3, 7)
    assert ((probs > 0).sum(-1) == k).all()


def test_penalties_match_reference():
    torch.manual_seed(1)
    V = 30
    logits = torch.randn(3, V) * 2
    prompts = [[1, 2, 3, 3], [5], []]
    outputs = [[3, 4, 4, 4], [], [7, 7, 8]]
    rep, pres, freq = torch.tensor([1.3, 1.0, 0.8]), torch.tensor([0.5, 0.2, 0.0]), torch.tensor([0.1, 0.0, -0.4])
    got = sampling.apply_penalties(logits, prompts, outputs, rep, pres, freq)
    for b in range(3):
        want = sampling.apply_penalties_reference(logits[b], prompts[b], outputs[b], float(rep[b]), float(pres[b]),
                                                  float(freq[b]))
        assert torch.allclose(got[b].double(), want, atol=1e-6)
    assert not torch.equal(got, logits)


def test_sample_draws_from_the_filtered_distribution():
    torch.manual_seed(2)
    V, n = 8, 6000
    logits = torch.randn(1, V).repeat(n, 1)
    temp, k, p, m = torch.full((n,), 0.9), torch.full((n,), 5), torch.full((n,), 0.85), torch.zeros(n)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    tokens = sampling.sample(logits, temp, k, p, m, gens)
    freq = torch.bincount(tokens, minlength=V).double() / n
    want = sampling.filter_probs_reference(logits[0], 0.9, 5, 0.85, 0.0)
    assert (freq[want == 0] == 0).all()
    assert (freq - want).abs().max() < 0.03, (freq, want)


def test_seeded_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(3)
    V = 100
    row = torch.randn(1, V)
    alone = [int(sampling.sample(row, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.9]),
                                 torch.tensor([0.0]), [torch.Generator().manual_seed(7)]))]
    batch = torch.cat([torch.randn(2, V), row, torch.randn(1, V)])
    got = sampling.sample(batch, torch.tensor([0.0, 1.0, 1.0, 0.5]), torch.tensor([0, 3, 0, 0]),
                          torch.tensor([1.0, 1.0, 0.9, 1.0]), torch.zeros(4),
                          [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(7),
                           torch.Generator().manual_seed(2)])
    assert int(got[2]) == alone[0]
    assert int(got[0]) == int(batch[0].argmax())


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = torch.randn(4, 33)
    tok = sampling.sample(logits, torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.ones(4), torch.zeros(4),
                          [None] * 4)
    assert torch.equal(tok, logits.argmax(-1))
    chosen, top_v, top_i = sampling.logprobs(logits, tok, 3)
    lp = logits.log_softmax(-1)
    assert torch.allclose(chosen, lp.max(-1).values)
    assert torch.equal(top_i, lp.topk(3).indices)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("n", 0),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("max_tokens", 0),
    ("min_tokens", -1), ("stop", [""]), ("stop", 5), ("stop_token_ids", [-1]), ("logprobs", 21), ("seed", 1.5),
    ("ignore_eos", 1), ("banned_token_ids", [-1]), ("banned_token_ids", 3),
])
def test_sampling_params_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_sampling_params_normalise_stop():
    p = SamplingParams(stop="###", stop_token_ids=[3])
    assert p.stop == ("###",) and p.stop_token_ids == (3,)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
