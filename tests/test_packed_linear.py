"""Prepacked bf16 CPU weights (kimi/ops/packed_linear.py) against their plain twin: bit-for-bit the same logits for a
K2-style model and a Kimi Linear hybrid (oneDNN's kernels; the C single-row path is in tests/test_cpu_kernels.py), the same greedy tokens through the engine (which packs a model directory it
loads), and a packed model refuses to be saved."""

import pytest
import torch

from kimi.engine.engine import LLM
from kimi.engine.sampling_params import SamplingParams
from kimi.model.generate import generate
from kimi.model.loader import load_model, save_model
from kimi.model.model import build_model
from kimi.ops import cpu_kernels, packed_linear
from kimi.ops.packed_linear import PackedExperts, PackedLinear, is_packed, pack_for_cpu
from tests.test_model import k2_tiny, kl_tiny

pytestmark = pytest.mark.skipif(not packed_linear.supported(torch.device("cpu"), torch.bfloat16),
                                reason="this CPU's oneDNN has no bf16 kernels")
FAMILIES = {"k2": k2_tiny, "kimi_linear": kl_tiny}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_are_bitwise_equal(family, monkeypatch):
    # single rows go through kimi's C gemv where it runs (a different summation order: tests/test_cpu_kernels.py);
    # oneDNN's packed kernels alone are held to bit-equality here
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    plain = build_model(FAMILIES[family](), dtype=torch.bfloat16, seed=3).eval()
    packed = build_model(FAMILIES[family](), dtype=torch.bfloat16, seed=3).eval()
    n = pack_for_cpu(packed)
    kinds = {type(m) for m in packed.modules()}
    assert n > 0 and PackedLinear in kinds and PackedExperts in kinds
    for name, m in packed.named_modules():  # what other code reads stays a plain weight
        if name.endswith("kv_b_proj"):
            assert type(m) is torch.nn.Linear
    ids = torch.randint(0, plain.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(37)[None].expand(2, 37)
    with torch.inference_mode():
        assert torch.equal(plain(ids, positions=pos), packed(ids, positions=pos))
    assert generate(plain, [5, 9, 2, 7], 12)[0] == generate(packed, [5, 9, 2, 7], 12)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_packs_what_it_loads_and_matches_the_reference(family, tmp_path):
    save_model(build_model(FAMILIES[family](), dtype=torch.bfloat16, seed=4), tmp_path)
    llm = LLM(tmp_path, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128, block_size=8)
    assert is_packed(llm.model)
    reference = load_model(tmp_path, dtype=torch.bfloat16).eval()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3, 3, 9, 8, 8, 7]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == generate(reference, p, 10)[0]
    assert not is_packed(LLM(tmp_path, max_model_len=128, pack_weights=False).model)


def test_packed_model_is_inference_only(tmp_path):
    model = build_model(k2_tiny(), dtype=torch.bfloat16, seed=5)
    pack_for_cpu(model)
    with pytest.raises(ValueError, match="packed for CPU inference"):
        save_model(model, tmp_path)
    with pytest.raises(ValueError, match="bfloat16 model on a CPU"):
        pack_for_cpu(build_model(k2_tiny(), dtype=torch.float16, seed=5))
