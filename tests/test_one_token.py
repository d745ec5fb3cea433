"""Batch-1 decode's flat program of C calls (kimi/ops/one_token.py) against the packed model's module path it
replaces: the same logits bit for bit, step after step, for a K2-style model and a Kimi Linear hybrid (KDA states
updated in place), over consecutive and scattered cache blocks; and where it does not apply, the runner keeps the
module path."""

import pytest
import torch

from kimi.engine.engine import LLM
from kimi.engine.sampling_params import SamplingParams
from kimi.model.loader import save_model
from kimi.model.model import build_model
from kimi.ops import cpu_kernels, packed_linear
from tests.test_model import k2_tiny, kl_tiny

pytestmark = pytest.mark.skipif(
    not (packed_linear.supported(torch.device("cpu"), torch.bfloat16) and cpu_kernels.bf16_dot()),
    reason="the flat program needs oneDNN bf16 packing and kimi's AVX512-BF16 kernels")
FAMILIES = {"k2": k2_tiny, "kimi_linear": kl_tiny}


def _generate(path, fast: bool) -> tuple[list, list, int]:
    """Two requests batched, the short one finishing first so the long one decodes alone over blocks interleaved
    with the other's; then one request alone over consecutive blocks -> (tokens, logprobs, flat-program calls)."""
    llm = LLM(path, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=128, block_size=4,
              enable_prefix_caching=False)
    program = llm.runner.one_token
    assert program is not None
    calls = [0]

    def counted(*args):
        calls[0] += 1
        return program(*args)

    llm.runner.one_token = counted if fast else None
    g = torch.Generator().manual_seed(0)
    long, short, alone = (torch.randint(0, 96, (n,), generator=g).tolist() for n in (13, 6, 21))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3) for n in (24, 3)]
    outs = llm.generate([long, short], params) + llm.generate([alone], params[:1])
    return [o.token_ids for o in outs], [o.logprobs for o in outs], calls[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_program_equals_the_module_path(family, tmp_path):
    save_model(build_model(FAMILIES[family](), dtype=torch.bfloat16, seed=7), tmp_path)
    fast_tokens, fast_logprobs, calls = _generate(tmp_path, True)
    tokens, logprobs, none = _generate(tmp_path, False)
    assert calls >= 40 and none == 0  # the long request's lone steps and all of the lone request's
    assert fast_tokens == tokens and fast_logprobs == logprobs  # logprobs are floats: equal means bit for bit


def test_runner_keeps_the_module_path_where_the_program_does_not_apply(tmp_path):
    save_model(build_model(k2_tiny(), dtype=torch.bfloat16, seed=7), tmp_path)
    assert LLM(tmp_path, max_model_len=64, pack_weights=False).runner.one_token is None  # unpacked
    assert LLM(tmp_path, max_model_len=64, dtype=torch.float32).runner.one_token is None  # fp32 copies
    assert LLM(tmp_path, max_model_len=64).runner.one_token is not None
