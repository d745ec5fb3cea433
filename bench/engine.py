"""Engine benchmarks (issue 5): kimi's engine vs transformers `generate` on the same weights, same machine, one run.

  1. batch-1 decode tokens/s, kimi vs transformers (DeepseekV3ForCausalLM loading the same K2-style checkpoint),
     best of 3 interleaved rounds each;
  2. many concurrent requests (ignore_eos): total output tokens/s, kimi vs transformers one request at a time and
     vs transformers batched with left padding;
  3. batch-1 decode as a percentage of the memory-bandwidth roofline: (active weight bytes + cache bytes read per
     token) / time per token, over the measured copy bandwidth (read + write bytes per second of a large copy_);
  4. long context: decode time per token at several context lengths for a Kimi Linear-style hybrid (KDA:MLA 3:1)
     and the same model with every layer MLA; the cache is filled with random latents and states (decode cost does
     not depend on the values); the growth of cost per token with context is compared;
  5. prefix caching: time to first token of a long prompt whose first 7/8 are cached (a previous request was that
     prefix), vs the same prompt on an engine with prefix caching off.
Correctness in the same run: kimi's greedy batch-1 tokens must equal the reference generate's, and the batched
engine's greedy tokens must equal kimi run one request at a time; speed-ups are reported only when they hold.

    python bench/engine.py [--quick] [--threads N] [--dtype auto|bfloat16|float32] [--device cuda]
                           [--skip-padded | --padded-timeout SECONDS]

--quick scales the sizes down (for a shared 2-core CPU box); without it the sizes are the issue's. Prints a table,
then one JSON line last. Threads default to torch's own choice (the physical cores), what a user of either side
gets; on the 2-core AVX2 EPYC of 2026-12-04 two threads ran a 2048 x 768 x 2048 fp32 product at 170 GFLOP/s vs 87 on
one, with small ops no slower. On a contended machine (earlier sessions' 2-core boxes) idle OpenMP workers made 2
threads 10-100x slower for small ops, for transformers and kimi alike: there, pass --threads 1. --device cuda runs
both sides on the GPU (timings synchronise the device; the roofline uses the GPU's copy bandwidth); the fp32
correctness checks run there too.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import tempfile
import time

import torch

from kimi.config import ModelConfig
from kimi.engine.engine import LLM
from kimi.engine.sampling_params import SamplingParams
from kimi.engine.sequence import SequenceStatus
from kimi.model.cost import kda_state_bytes_per_sequence, mla_cache_bytes_per_token, param_count
from kimi.model.generate import generate
from kimi.model.loader import save_model
from kimi.model.model import build_model
from kimi.ops.dtypes import bf16_is_fast, default_dtype
from kimi.ops import packed_linear
from kimi.ops.bf16_weights import has_copies

K2_BENCH = {  # ~206M parameters, ~90M active per token
    "model_type": "deepseek_v3", "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
    "moe_intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "q_lora_rank": 384,
    "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 16,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.5, "max_position_embeddings": 4096, "rope_theta": 50000.0, "bos_token_id": 0,
    "eos_token_id": 1, "pad_token_id": 2, "initializer_range": 0.05}

KL_LONG = {  # a small Kimi Linear-style model for the long-context and prefix-caching items
    "model_type": "kimi_linear", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1024,
    "moe_intermediate_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8, "kv_lora_rank": 256,
    "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "num_experts": 8, "num_experts_per_token": 2,
    "num_shared_experts": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 2.446,
    "linear_attn_config": {"kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8], "head_dim": 64,
                           "num_heads": 8, "short_conv_kernel_size": 4},
    "max_position_embeddings": 262144, "initializer_range": 0.05}


class Rows(list):
    """Table rows; each also goes to stderr as soon as it is measured (a full run takes long)."""

    def append(self, row):
        print("  ".join(x for x in row if x), file=sys.stderr, flush=True)
        super().append(row)


DEVICE = torch.device("cpu")  # set from --device in main()


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 256 MiB copy_ (best of 5)."""
    src = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src))[0] for _ in range(5))
    return 2 * src.numel() / best


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def kimi_decode_rate(llm, prompt, n):
    """Seconds per decoded token at batch 1: (time for 1 + n tokens - time for 1 token) / n; and the tokens of the
    first (warm-up) run, the only one that computes the whole prompt: the timed runs take most of it from the prefix
    cache, which in bf16 rounds differently from the reference generate's full prefill."""
    tokens = llm.generate([prompt], greedy(1 + n))[0].token_ids
    t_n, _ = timed(lambda: llm.generate([prompt], greedy(1 + n)))
    t_1, _ = timed(lambda: llm.generate([prompt], greedy(1)))
    return (t_n - t_1) / n, tokens


def hf_decode_rate(hf, prompt, n):
    ids = torch.tensor([prompt], device=DEVICE)

    def run(k):
        return hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=2)

    run(2)
    t_n, out = timed(lambda: run(1 + n))
    t_1, _ = timed(lambda: run(1))
    return (t_n - t_1) / n, out[0, len(prompt):].tolist()


def hf_generate_one_by_one(hf, prompts, n):
    total = 0.0
    for p in prompts:
        ids = torch.tensor([p], device=DEVICE)
        total += timed(lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           pad_token_id=2))[0]
    return total


def hf_generate_padded(hf, prompts, n, pad=2):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    return timed(lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=pad))[0]


def _padded_child(path, dtype, threads, prompts, n, conn):
    torch.set_num_threads(threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # tqdm's lock is a semaphore the stopped child would leak
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    conn.send("loaded")
    with torch.inference_mode():
        conn.send(hf_generate_padded(hf, prompts, n))


def hf_generate_padded_bounded(path, dtype, prompts, n, timeout: float) -> tuple[float, bool]:
    """hf_generate_padded in a child process that loads the checkpoint at `path` itself, stopped `timeout` seconds
    after it starts generating (CPU): (seconds, finished). In fp32 on a CPU without native bf16 transformers' padded
    batch of the full-size item runs for over 50 minutes; a bound on it says whether kimi is >= 3x faster. (A spawned
    child, not a forked one: a forked torch can hang in its first OpenMP region. A pipe, not a queue: a queue's lock
    would leak with the stopped child.)"""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_padded_child, args=(path, dtype, torch.get_num_threads(), prompts, n, child_conn),
                        daemon=True)
    child.start()
    try:
        if not (conn.poll(600) and conn.recv() == "loaded"):
            raise RuntimeError("transformers' padded-batch child did not load the checkpoint within 10 minutes")
        t = time.perf_counter()
        if conn.poll(timeout):
            return conn.recv(), True
        return time.perf_counter() - t, False
    finally:
        child.kill()
        child.join()
        conn.close()


def fill_and_decode(llm, context: int, steps: int) -> float:
    """Seconds per decode step of one sequence with `context` tokens already cached (random latents and states)."""
    rng = random.Random(context)
    prompt = [rng.randrange(3, llm.config.vocab_size) for _ in range(context + 1)]
    req = llm._make_request(prompt, greedy(steps + 2), "long")
    seq = req.seqs[0]
    sch = llm.scheduler
    sch.blocks.admit(seq, [], [])
    assert sch.blocks.grow(seq, context + steps + 2)
    seq.state_slot = sch.states.allocate()
    seq.num_computed_tokens, seq.admitted, seq.status = context, True, SequenceStatus.RUNNING
    llm.runner.kv_cache.normal_()
    if llm.runner.states.has_state:
        llm.runner.states.state[:, seq.state_slot].normal_(0, 0.1)
    sch.running.append(seq)
    llm.requests["long"] = req
    llm.step()  # warm-up
    times = [timed(llm.step)[0] for _ in range(steps)]
    sch.finish(seq, "abort")
    del llm.requests["long"]
    return statistics.median(times)


def correctness(k2: ModelConfig, kl: ModelConfig, prompts: list[list[int]]) -> dict:
    """The identities the engine guarantees, checked in fp32 on the benchmark's own configs (bf16 argmax over
    near-flat random logits flips with any change of summation order, so bf16 agreement is reported, not asserted):
    batch-1 greedy == the reference generate; batched == each request alone; prefix hit == caching off (hybrid).
    The weights are a bf16 checkpoint's, so on a CPU the engine's copy streams bf16 copies (bf16_weights.py)."""
    m = build_model(k2, dtype=torch.bfloat16, seed=0, device=DEVICE).float().eval()
    llm = LLM(copy.deepcopy(m), max_num_seqs=8, max_num_batched_tokens=512, max_model_len=1024, block_size=16,
              pack_weights=packed_linear.supported(DEVICE, torch.float32))
    ps = [p[:96] for p in prompts[:4]]
    single = llm.generate(ps[:1], greedy(12))[0].token_ids == generate(m, ps[0], 12)[0]
    batched = [o.token_ids for o in llm.generate(ps, greedy(8))] == [generate(m, p, 8)[0] for p in ps]
    m = build_model(kl, dtype=torch.bfloat16, seed=2, device=DEVICE).float().eval()
    if packed_linear.supported(DEVICE, torch.float32):
        packed_linear.pack_for_cpu(m)
    rng = random.Random(5)
    p = [rng.randrange(3, kl.vocab_size) for _ in range(256)]
    outs = {}
    for caching in (True, False):
        eng = LLM(m, max_num_seqs=2, max_num_batched_tokens=1024, max_model_len=512, block_size=16,
                  enable_prefix_caching=caching)
        eng.generate([p[:224]], greedy(1))
        out = eng.generate([p], greedy(8))[0]
        outs[caching] = (out.token_ids, out.num_cached_tokens)
    prefix = outs[True][0] == outs[False][0] and outs[True][1] > 0 and outs[False][1] == 0
    return {"batch1_equals_reference_generate": single, "batched_equals_reference": batched,
            "prefix_hit_equals_caching_off": prefix}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes for a small CPU box")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch CPU threads for both sides (default: torch's choice, %(default)s here)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="weights and cache dtype, both sides; auto: bfloat16 where the device computes it natively, "
                         "else float32 (kimi/ops/dtypes.py), as kimi's engine picks by default")
    ap.add_argument("--device", default="cpu", help="torch device for both sides, e.g. cpu or cuda")
    padded = ap.add_mutually_exclusive_group()
    padded.add_argument("--skip-padded", action="store_true",
                        help="leave out transformers' padded batch of the concurrent item (in fp32 on an AVX2-only "
                             "CPU it alone ran over 50 minutes)")
    padded.add_argument("--padded-timeout", type=float, default=None, metavar="SECONDS",
                        help="run transformers' padded batch in a child process and stop it after SECONDS (CPU): "
                             "if it has not finished, report the speed-up as at least SECONDS / kimi's time")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = default_dtype(DEVICE) if args.dtype == "auto" else getattr(torch, args.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    q = args.quick
    n_conc, plen, out_len = (8, (64, 256), 32) if q else (64, (256, 1024), 128)
    hf_seq_sample = n_conc if q else 8  # transformers one-at-a-time: measured on this many, scaled to all
    contexts = [2048, 8192, 32768] if q else [4096, 32768, 131072]
    ttft_len = 1024 if q else 4096
    decode_n = 16 if q else 64
    rng = random.Random(0)
    machine = (f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}, bf16 "
               f"{'native' if bf16_is_fast('cpu') else 'emulated'}), {torch.get_num_threads()} thread(s)")
    if DEVICE.type == "cuda":
        machine = torch.cuda.get_device_name(DEVICE)
    res: dict = {"machine": machine, "dtype": dtype_name, "quick": q}
    rows = Rows()

    # ---- 1-3: the K2-style model, kimi vs transformers -------------------------------------------------------
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = ModelConfig.from_dict(K2_BENCH)
    # a bf16 checkpoint, as real ones are; both sides load it in `dtype` (in fp32: the same weights, widened)
    model = build_model(cfg, dtype=torch.bfloat16, seed=0, device=DEVICE).eval()
    tmp = tempfile.mkdtemp()
    save_model(model, tmp)
    model = model.to(dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(DEVICE).eval()
    pc = param_count(cfg)
    # the engine loads the checkpoint as a user's would (and so prepacks bf16 CPU weights, or keeps bf16 copies of
    # an fp32 model's weights: kimi/ops/packed_linear.py, bf16_weights.py); `model` stays the plain reference
    llm = LLM(tmp, dtype=dtype, device=DEVICE, max_num_seqs=n_conc, max_num_batched_tokens=2048, max_model_len=2048,
              block_size=16)
    pack = packed_linear.supported(DEVICE, dtype)
    copies = has_copies(llm.model)
    res["packed_weights"] = "bf16 copies" if copies else "oneDNN" if packed_linear.is_packed(llm.model) else "none"
    prompt = [rng.randrange(3, cfg.vocab_size) for _ in range(64)]
    with torch.inference_mode():
        # best of 3 interleaved rounds for each side: on a shared machine noise only ever adds time
        rounds = [(kimi_decode_rate(llm, prompt, decode_n), hf_decode_rate(hf, prompt, decode_n)) for _ in range(3)]
        kimi_s, kimi_tokens = min(r[0][0] for r in rounds), rounds[0][0][1]
        hf_s, hf_tokens = min(r[1][0] for r in rounds), rounds[0][1][1]
        ref_tokens = generate(model, prompt, decode_n + 1)[0]
    res["batch1_decode_tok_s"] = {"kimi": 1 / kimi_s, "transformers": 1 / hf_s, "speedup": hf_s / kimi_s}
    res["batch1_same_tokens_as_reference_generate"] = kimi_tokens == ref_tokens
    res["batch1_same_first_token_as_transformers"] = kimi_tokens[:1] == hf_tokens[:1]
    rows.append(("batch-1 decode tok/s", f"{1 / kimi_s:.1f}", f"{1 / hf_s:.1f}", f"{hf_s / kimi_s:.2f}x"))

    ctx = len(prompt) + decode_n // 2
    # bytes per weight as kimi streams them: 2 with bf16 copies of fp32 weights (and the fp32 kv_b_proj counted at 2
    # too: the roofline is, if anything, a little high)
    weight_bytes = (pc.active - pc.embedding) * (2 if copies else torch.finfo(dtype).bits // 8)
    cache_bytes = mla_cache_bytes_per_token(cfg, torch.finfo(dtype).bits // 8) * ctx
    bw = copy_bandwidth()
    roof_s = (weight_bytes + cache_bytes) / bw
    res["roofline"] = {"params_total": pc.total, "params_active": pc.active,
                       "bytes_per_token": weight_bytes + cache_bytes,
                       "copy_bandwidth_GBs": bw / 1e9, "roofline_tok_s": 1 / roof_s,
                       "percent_of_roofline": 100 * roof_s / kimi_s}
    rows.append(("batch-1 % of bandwidth roofline", f"{100 * roof_s / kimi_s:.1f}%", "",
                 f"roof {1 / roof_s:.1f} tok/s @ {bw / 1e9:.1f} GB/s"))

    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(*plen))] for _ in range(n_conc + 2)]
    warm, prompts = prompts[:2], prompts[2:]  # the warm-up's prompts are not the measured ones (no prefix hits)
    with torch.inference_mode():
        llm.generate(warm, greedy(2))
        t_kimi, outs = timed(lambda: llm.generate(prompts, greedy(out_len)))
        # the prefill alone (one output token each, on an engine with prefix caching off): the floor under t_kimi
        cold = LLM(tmp, dtype=dtype, device=DEVICE, max_num_seqs=n_conc, max_num_batched_tokens=2048,
                   max_model_len=2048, block_size=16, enable_prefix_caching=False)
        t_prefill = timed(lambda: cold.generate(prompts, greedy(1)))[0]
        del cold
        check = [llm.generate([p], greedy(out_len))[0].token_ids for p in prompts[:4]]
        t_hf_seq = hf_generate_one_by_one(hf, prompts[:hf_seq_sample], out_len) * n_conc / hf_seq_sample
        pad_done = True
        if args.skip_padded:
            t_hf_pad = None
        elif args.padded_timeout is not None and DEVICE.type == "cpu":
            t_hf_pad, pad_done = hf_generate_padded_bounded(tmp, dtype, prompts, out_len, args.padded_timeout)
        else:
            t_hf_pad = hf_generate_padded(hf, prompts, out_len)
    same_batched = sum(o.token_ids == c for o, c in zip(outs, check)) / len(check)
    total_out = n_conc * out_len
    res["concurrent"] = {"requests": n_conc, "prompt_len": list(plen), "output_len": out_len,
                         "kimi_tok_s": total_out / t_kimi, "transformers_sequential_tok_s": total_out / t_hf_seq,
                         "speedup_vs_sequential": t_hf_seq / t_kimi, "kimi_prefill_only_s": t_prefill,
                         "prompt_tokens": sum(map(len, prompts)),
                         "sequential_measured_on": hf_seq_sample, "batched_same_as_single": same_batched}
    rows.append((f"{n_conc} concurrent, out tok/s", f"{total_out / t_kimi:.1f}", f"seq {total_out / t_hf_seq:.1f}",
                 f"{t_hf_seq / t_kimi:.1f}x"))
    rows.append(("  of which prefill alone", f"{t_prefill:.1f} s", f"all {t_kimi:.1f} s",
                 f"{sum(map(len, prompts)) / t_prefill:.0f} prompt tok/s"))
    if t_hf_pad is not None and pad_done:
        res["concurrent"].update(transformers_padded_tok_s=total_out / t_hf_pad, speedup_vs_padded=t_hf_pad / t_kimi)
        rows.append(("", "", f"padded {total_out / t_hf_pad:.1f}", f"{t_hf_pad / t_kimi:.1f}x"))
    elif t_hf_pad is not None:  # stopped at the timeout: transformers was at most this fast
        res["concurrent"].update(transformers_padded_stopped_after_s=t_hf_pad,
                                 transformers_padded_tok_s_at_most=total_out / t_hf_pad,
                                 speedup_vs_padded_at_least=t_hf_pad / t_kimi)
        rows.append(("", "", f"padded <= {total_out / t_hf_pad:.1f} (stopped)", f">= {t_hf_pad / t_kimi:.1f}x"))
    del hf, llm

    # ---- 4: long context, hybrid vs all-MLA ----------------------------------------------------------------
    kl = ModelConfig.from_dict(KL_LONG)
    mla_only = kl.replace(layer_types=("mla",) * kl.num_hidden_layers)
    elt = torch.finfo(dtype).bits // 8
    long = {}
    for name, c in (("hybrid", kl), ("all_mla", mla_only)):
        m = build_model(c, dtype=torch.bfloat16, seed=1, device=DEVICE).to(dtype).eval()
        eng = LLM(m, max_num_seqs=1, max_num_batched_tokens=4096, max_model_len=max(contexts) + 64, block_size=64,
                  num_blocks=(max(contexts) + 64) // 64 + 1, enable_prefix_caching=False, pack_weights=pack)
        with torch.inference_mode():
            per = {n: fill_and_decode(eng, n, 5 if q else 8) for n in contexts}
        long[name] = {"s_per_token": per, "cache_bytes_per_token": mla_cache_bytes_per_token(c, elt),
                      "state_bytes_per_seq": kda_state_bytes_per_sequence(c, elt),
                      "cache_bytes_at_max": mla_cache_bytes_per_token(c, elt) * max(contexts)
                      + kda_state_bytes_per_sequence(c, elt),
                      "params": param_count(c).total}
        del eng, m
    lo, hi = min(contexts), max(contexts)
    slope = {k: (v["s_per_token"][hi] - v["s_per_token"][lo]) / (hi - lo) for k, v in long.items()}
    long["growth_ratio_hybrid_over_mla"] = slope["hybrid"] / slope["all_mla"]
    long["speedup_at_max_context"] = long["all_mla"]["s_per_token"][hi] / long["hybrid"]["s_per_token"][hi]
    long["cache_reduction"] = 1 - long["hybrid"]["cache_bytes_at_max"] / long["all_mla"]["cache_bytes_at_max"]
    res["long_context"] = long
    for n in contexts:
        rows.append((f"decode ms/token @ {n // 1024}k ctx", f"hybrid {1e3 * long['hybrid']['s_per_token'][n]:.1f}",
                     f"all-MLA {1e3 * long['all_mla']['s_per_token'][n]:.1f}",
                     f"{long['all_mla']['s_per_token'][n] / long['hybrid']['s_per_token'][n]:.2f}x"))
    rows.append(("cost growth hybrid / all-MLA", f"{long['growth_ratio_hybrid_over_mla']:.3f}", "(target <= 0.3)",
                 f"cache -{100 * long['cache_reduction']:.0f}%"))

    # ---- 5: prefix caching time to first token -------------------------------------------------------------
    ttft = {}
    cached_len = ttft_len * 7 // 8
    for name, c in (("hybrid", kl), ("k2_style", cfg)):
        m = build_model(c, dtype=torch.bfloat16, seed=2, device=DEVICE).to(dtype).eval()
        p = [rng.randrange(3, c.vocab_size) for _ in range(ttft_len)]
        times, firsts = {}, {}
        for caching in (True, False):
            eng = LLM(m, max_num_seqs=2, max_num_batched_tokens=8192, max_model_len=ttft_len + 16, block_size=16,
                      enable_prefix_caching=caching, pack_weights=pack)
            with torch.inference_mode():
                warm = [rng.randrange(3, c.vocab_size) for _ in range(ttft_len)]  # first use of each code path
                eng.generate([warm[:cached_len]], greedy(1))                      # (lazy CUDA kernel loads)
                eng.generate([warm], greedy(1))
                eng.generate([p[:cached_len]], greedy(1))  # an earlier request: the shared prefix
                t, out = timed(lambda: eng.generate([p], greedy(1)))
            times[caching], firsts[caching] = t, (out[0].token_ids, out[0].num_cached_tokens)
        ttft[name] = {"prompt": ttft_len, "cached_tokens": firsts[True][1], "ttft_cached_s": times[True],
                      "ttft_uncached_s": times[False], "speedup": times[False] / times[True],
                      "same_first_token": firsts[True][0] == firsts[False][0]}
        rows.append((f"TTFT {ttft_len} tok, {name}", f"cached {times[True] * 1e3:.0f} ms",
                     f"uncached {times[False] * 1e3:.0f} ms", f"{times[False] / times[True]:.1f}x "
                     f"({firsts[True][1]} hit)"))
        del m
    res["prefix_ttft"] = ttft

    checks = correctness(cfg, kl, prompts)
    res["correctness_fp32"] = checks
    correct = res["correct"] = all(checks.values())
    if not correct:  # a speed-up is not reported when the same run's correctness check fails
        for k in ("batch1_decode_tok_s", "concurrent", "long_context", *(f"prefix_ttft.{n}" for n in ttft)):
            d = res[k] if "." not in k else res["prefix_ttft"][k.split(".")[1]]
            for key in ("speedup", "speedup_vs_sequential", "speedup_vs_padded", "speedup_at_max_context"):
                d.pop(key, None)
    print(f"machine: {res['machine']}, {dtype_name}; model {pc.total / 1e6:.0f}M params "
          f"({pc.active / 1e6:.0f}M active)")
    print(f"{'metric':36s} {'kimi':>22s} {'baseline':>22s} {'ratio':>24s}")
    for r in rows:
        print(f"{r[0]:36s} {r[1]:>22s} {r[2]:>22s} {r[3] if correct else '(withheld)':>24s}")
    print(f"correctness (fp32): {checks}" + ("" if correct else "  -> FAILED: speed-ups withheld"))
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main()
