"""kimi's C CPU kernels (kimi/ops/cpu_kernels.py) against the torch paths they replace, mostly decode's.

  1. y = x W^T for one row of x on bench/engine.py's weight shapes: kimi's gemv vs oneDNN-prepacked weights
     (kimi/ops/packed_linear.py) vs torch's F.linear, as GB/s of weight read (enough distinct matrices of each shape
     to fill 256 MiB, so the weights come from memory as in decode, not from cache);
  2. MLA absorbed decode attention for one sequence (bench/engine.py's K2-style layer: 8 heads, kv_lora 256, rope
     32) over contexts of 100 to 8,192 tokens: kimi's one-call kernel (with AVX512-BF16 pair dot products where the
     CPU has them, and in its fp32 form) vs ops/attention.py's torch path; and the same for a decode batch of 64
     sequences of 256-1,152 tokens in randomly placed 16-row blocks (bench/engine.py's concurrent item, one layer);
     and MLA prefill attention of one chunk (the expanded form, causal; where the CPU has AVX512-BF16): kimi's
     mla_prefill (kv_b_proj's product included) vs MLA.attend_expanded (torch's SDPA flash attention). And a MoE
     block's routed experts (bench/engine.py's: 16 experts of 768 x 512, 2 per token) for 1 to 1,024 tokens: kimi's
     one-call moe_experts vs the per-expert oneDNN products it replaced (kimi/ops/packed_linear.PackedExperts), over
     enough layers' experts to fill 256 MiB, so the weights come from memory as in decode.
  3. fp32 models (CPUs without native bf16): y = x W^T for one fp32 row on the same shapes, kimi's gemv_fp32 reading
     a bf16 copy of a bf16-exact weight (kimi/ops/bf16_weights.py) vs torch's fp32 F.linear on the fp32 weight, as
     time per product and the GB/s each reads; the same for 2-128 rows on two shapes
     (bf16_weights.FEW_ROWS, where the copies stop, is read off these); and MLA absorbed decode in fp32
     over 100 to 32,768 tokens, kimi's mla_decode_fp32 (kv_b_proj's bf16 copy) vs ops/attention.py's torch path.
Items 1-2 need the AVX-512 kernels, item 3 the AVX2 one; what the CPU cannot run is left out and said so.
Correctness first, in the same run: gemv within one bf16 rounding (plus fp32 summation noise) of an fp32 product,
gemv_fp32 within fp32 summation noise of it, the bf16 attention kernel within 2^-7 of the torch path's largest
output, the fp32 one within 1e-5.

    python bench/decode_kernels.py [--threads 1]
Prints a table, then one JSON line last.
"""

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from engine import K2_BENCH  # bench/engine.py's K2-style model

from kimi.config import ModelConfig
from kimi.model.mla import MLA, causal_mask
from kimi.ops import attention, cpu_kernels
from kimi.ops.bf16_weights import Bf16CopyLinear
from kimi.model.moe import Experts
from kimi.ops.packed_linear import PackedExperts, _linear, _pack

SHAPES = [(512, 768), (768, 512), (2048, 768), (768, 2048), (32000, 768)]  # [out, in] as in bench/engine.py's model
CONTEXTS = [100, 512, 2048, 8192]
PREFILL_CHUNKS = [(256, 0), (1024, 0), (2048, 0), (512, 512)]  # (queries, position of the first)


def best_of(fn, repeats=5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def linear_row(shape) -> dict:
    out, inn = shape
    count = max(1, (256 << 20) // (out * inn * 2))
    weights = [torch.randn(out, inn).bfloat16() for _ in range(count)]
    packed = [_pack(w) for w in weights]
    x = torch.randn(1, inn).bfloat16()
    ref = x.float() @ weights[0].float().T
    ok = bool(((cpu_kernels.gemv(x, weights[0]).float() - ref).abs()
               <= ref.abs() * 2 ** -8 + 1e-5 * (x.float().abs() @ weights[0].float().abs().T)).all())
    nbytes = count * out * inn * 2
    gbs = {name: nbytes / best_of(lambda: [fn(x, w) for w in ws]) / 1e9 for name, fn, ws in [
        ("gemv", cpu_kernels.gemv, weights), ("onednn_packed", _linear, packed), ("F.linear", F.linear, weights)]}
    return {"shape": list(shape), "GB_s": gbs, "gemv_correct": ok,
            "gemv_vs_packed": gbs["gemv"] / gbs["onednn_packed"], "gemv_vs_F.linear": gbs["gemv"] / gbs["F.linear"]}


def linear_row_fp32(shape, rows: int = 1) -> dict:
    out, inn = shape
    count = max(1, (256 << 20) // (out * inn * 4))  # 256 MiB of fp32 weights: from memory, as in decode
    copies = [torch.randn(out, inn).bfloat16() for _ in range(count)]
    weights = [w.float() for w in copies]
    x = torch.randn(rows, inn)
    ref = x.double() @ weights[0].double().T
    ok = bool(((cpu_kernels.gemv_fp32(x, copies[0]).double() - ref).abs()
               <= 1e-6 * (x.double().abs() @ weights[0].double().abs().T)).all())
    t_gemv = best_of(lambda: [cpu_kernels.gemv_fp32(x, w) for w in copies]) / count
    t_torch = best_of(lambda: [F.linear(x, w) for w in weights]) / count
    return {"shape": list(shape), "rows": rows, "us": {"gemv_fp32": t_gemv * 1e6, "F.linear_fp32": t_torch * 1e6},
            "GB_s": {"gemv_fp32": out * inn * 2 / t_gemv / 1e9, "F.linear_fp32": out * inn * 4 / t_torch / 1e9},
            "gemv_fp32_correct": ok, "speedup": t_torch / t_gemv}


def attention_inputs(mla: MLA, context: int, dtype: torch.dtype):
    """A cache of context + 64 latent rows, one query, the context's rows (a slice) and its mask."""
    W = mla.kv_lora_rank + mla.qk_rope_head_dim
    cache = torch.randn(context + 64, W).to(dtype)
    q_nope = torch.randn(1, 1, mla.num_heads, mla.qk_nope_head_dim).to(dtype)
    q_pe = torch.randn(1, 1, mla.num_heads, mla.qk_rope_head_dim).to(dtype)
    return cache, q_nope, q_pe, slice(32, 32 + context), torch.ones(1, context, dtype=torch.bool)


def torch_attention(switch: str, mla: MLA, *inputs) -> torch.Tensor:
    """ops/attention.py's torch path: paged_decode with cpu_kernels.<switch> (the kernel's dispatch) saying False."""
    on = getattr(cpu_kernels, switch)
    setattr(cpu_kernels, switch, lambda: False)
    try:
        return attention.paged_decode(mla, *inputs)
    finally:
        setattr(cpu_kernels, switch, on)


def batch_attention_row(mla: MLA, batch: int = 64, lengths=(256, 1152), block: int = 16) -> dict:
    """One layer's decode attention for a batch, as the engine calls it: a paged cache of randomly placed blocks."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=g).tolist()
    blocks = [-(-n // block) for n in lens]
    order = torch.randperm(sum(blocks), generator=g).tolist()
    tables = [order[sum(blocks[:b]):sum(blocks[:b + 1])] for b in range(batch)]
    cache = torch.randn(sum(blocks) * block, mla.kv_lora_rank + mla.qk_rope_head_dim, generator=g).bfloat16()
    rows, mask = attention.context_rows(tables, lens, block, "cpu")
    q_nope = torch.randn(batch, 1, mla.num_heads, mla.qk_nope_head_dim, generator=g).bfloat16()
    q_pe = torch.randn(batch, 1, mla.num_heads, mla.qk_rope_head_dim, generator=g).bfloat16()
    bf16_dot = cpu_kernels.bf16_dot

    def kernel(pairs=True):
        cpu_kernels.bf16_dot = bf16_dot if pairs else (lambda: False)
        try:
            return cpu_kernels.mla_decode(mla, q_nope, q_pe, cache, rows, mask.sum(1))
        finally:
            cpu_kernels.bf16_dot = bf16_dot

    def torch_path():
        return torch_attention("available", mla, q_nope, q_pe, cache, rows, mask)

    want = torch_path().float()
    ok = all(bool((kernel(p).float() - want).abs().max() <= 2 ** -7 * want.abs().max()) for p in (True, False))
    t_kernel, t_fp32, t_torch = (best_of(lambda: [f() for _ in range(5)]) / 5
                                 for f in (kernel, lambda: kernel(False), torch_path))
    return {"batch": batch, "tokens": sum(lens), "ms": {"kernel": t_kernel * 1e3, "kernel_fp32": t_fp32 * 1e3,
            "torch": t_torch * 1e3}, "bf16_dot": bf16_dot(), "correct": ok, "speedup": t_torch / t_kernel}


def prefill_row(mla: MLA, T: int, start: int) -> dict:
    """One chunk of T queries at positions start.. over its whole context, both paths from the same latent."""
    g = torch.Generator().manual_seed(T)
    S = start + T
    q_nope = torch.randn(1, T, mla.num_heads, mla.qk_nope_head_dim, generator=g).bfloat16()
    q_pe = torch.randn(1, T, mla.num_heads, mla.qk_rope_head_dim, generator=g).bfloat16()
    latent = torch.randn(1, S, mla.kv_lora_rank + mla.qk_rope_head_dim, generator=g).bfloat16()
    mask = causal_mask(T, S, start, "cpu")

    def kernel():
        return cpu_kernels.mla_prefill(mla, q_nope, q_pe, latent, start)

    def torch_path():
        return mla.attend_expanded(q_nope, q_pe, latent, mask)

    want = torch_path().float()
    ok = bool((kernel().float() - want).abs().max() <= 2 ** -7 * want.abs().max())
    t_kernel, t_torch = (best_of(lambda: [f() for _ in range(3)]) / 3 for f in (kernel, torch_path))
    return {"queries": T, "start": start, "ms": {"kernel": t_kernel * 1e3, "torch": t_torch * 1e3}, "correct": ok,
            "speedup": t_torch / t_kernel}


def experts_row(tokens: int) -> dict:
    """One MoE block's routed experts for `tokens` tokens, per layer, over several layers' weights."""
    cfg = ModelConfig.from_dict(K2_BENCH)
    E, D, I, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    layers = max(1, (256 << 20) // (3 * E * D * I * 2))
    g = torch.Generator().manual_seed(tokens)
    stacks = []
    for _ in range(layers):
        experts = Experts(E, D, I)
        for w in experts.parameters():
            w.data = (torch.randn(w.shape, generator=g) * 0.05).bfloat16()
        stacks.append((PackedExperts(experts), PackedExperts(experts, tiles=False)))
    x = torch.randn(tokens, D, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g) * 2.5
    want = stacks[0][1](x, idx, w).float()
    ok = bool((stacks[0][0](x, idx, w).float() - want).abs().max() <= 2 ** -6 * want.abs().max())
    t_kernel, t_onednn = (best_of(lambda: [s[i](x, idx, w) for s in stacks]) / layers for i in (0, 1))
    return {"tokens": tokens, "ms": {"kernel": t_kernel * 1e3, "onednn": t_onednn * 1e3}, "correct": ok,
            "speedup": t_onednn / t_kernel}


def attention_row_fp32(mla: MLA, context: int) -> dict:
    cache, q_nope, q_pe, rows, mask = attention_inputs(mla, context, torch.float32)

    def torch_path():
        return torch_attention("fp32_available", mla, q_nope, q_pe, cache, rows, mask)

    def kernel():
        return cpu_kernels.mla_decode_fp32(mla, q_nope, q_pe, cache, rows, mask.sum(1))

    want = torch_path()
    ok = bool((kernel() - want).abs().max() <= 1e-5 * want.abs().max())
    n = max(5, 200 * 512 // max(context, 512))
    t_torch = best_of(lambda: [torch_path() for _ in range(n)]) / n
    t_kernel = best_of(lambda: [kernel() for _ in range(n)]) / n
    return {"context": context, "us": {"kernel": t_kernel * 1e6, "torch": t_torch * 1e6}, "correct": ok,
            "speedup": t_torch / t_kernel}


def attention_row(mla: MLA, context: int) -> dict:
    cache, q_nope, q_pe, rows, mask = attention_inputs(mla, context, torch.bfloat16)

    def torch_path():
        return torch_attention("available", mla, q_nope, q_pe, cache, rows, mask)

    bf16_dot = cpu_kernels.bf16_dot

    def kernel(pairs=True):  # pairs=False: the fp32 multiply-add form of CPUs without AVX512-BF16
        cpu_kernels.bf16_dot = bf16_dot if pairs else (lambda: False)
        try:
            return cpu_kernels.mla_decode(mla, q_nope, q_pe, cache, rows, mask.sum(1))
        finally:
            cpu_kernels.bf16_dot = bf16_dot

    want = torch_path().float()
    ok = all(bool((kernel(p).float() - want).abs().max() <= 2 ** -7 * want.abs().max()) for p in (True, False))
    n = max(10, 200 * 512 // max(context, 512))
    t_torch = best_of(lambda: [torch_path() for _ in range(n)]) / n
    t_kernel = best_of(lambda: [kernel() for _ in range(n)]) / n
    t_fp32 = best_of(lambda: [kernel(False) for _ in range(n)]) / n
    return {"context": context, "us": {"kernel": t_kernel * 1e6, "kernel_fp32": t_fp32 * 1e6, "torch": t_torch * 1e6},
            "bf16_dot": bf16_dot(), "correct": ok, "speedup": t_torch / t_kernel}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (cpu_kernels.available() or cpu_kernels.fp32_available()):
        raise SystemExit("kimi's C kernels are not available here (they need AVX-512 or AVX2 + FMA, and a C compiler)")
    res = {"machine": f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
                      f"{torch.get_num_threads()} thread(s)"}
    with torch.inference_mode():
        if not cpu_kernels.available():
            print("bf16 kernels (items 1-2): not available here (they need AVX-512)")
        else:
            res["linear_one_row"] = [linear_row(s) for s in SHAPES]
            for r in res["linear_one_row"]:
                g = r["GB_s"]
                print(f"{r['shape'][0]:>6} x {r['shape'][1]:<5} gemv {g['gemv']:5.1f} GB/s  oneDNN packed "
                      f"{g['onednn_packed']:5.1f}  F.linear {g['F.linear']:5.1f}  ({r['gemv_vs_packed']:.2f}x packed)"
                      f"{'' if r['gemv_correct'] else '  WRONG'}")
            cfg = ModelConfig.from_dict(K2_BENCH)
            mla = MLA(cfg, 0).bfloat16()
            torch.nn.init.normal_(mla.kv_b_proj.weight, std=0.05)
            res["mla_decode"] = [attention_row(mla, c) for c in CONTEXTS]
            for r in res["mla_decode"]:
                print(f"MLA decode, context {r['context']:>5}: kernel {r['us']['kernel']:7.1f} us (fp32 form "
                      f"{r['us']['kernel_fp32']:7.1f})  torch {r['us']['torch']:7.1f} us  ({r['speedup']:.2f}x)"
                      f"{'' if r['correct'] else '  WRONG'}")
            r = res["mla_decode_batch"] = batch_attention_row(mla)
            print(f"MLA decode, batch of {r['batch']} ({r['tokens']} context tokens): kernel {r['ms']['kernel']:6.2f} "
                  f"ms (fp32 form {r['ms']['kernel_fp32']:6.2f})  torch {r['ms']['torch']:6.2f} ms  "
                  f"({r['speedup']:.2f}x)"
                  f"{'' if r['correct'] else '  WRONG'}")
            if cpu_kernels.bf16_dot():
                res["mla_prefill"] = [prefill_row(mla, T, start) for T, start in PREFILL_CHUNKS]
                for r in res["mla_prefill"]:
                    print(f"MLA prefill, {r['queries']:>4} queries at {r['start']:>4}: kernel {r['ms']['kernel']:6.2f} "
                          f"ms  torch SDPA {r['ms']['torch']:6.2f} ms  ({r['speedup']:.2f}x)"
                          f"{'' if r['correct'] else '  WRONG'}")
                res["moe_experts"] = [experts_row(n) for n in (1, 4, 16, 64, 256, 1024)]
                for r in res["moe_experts"]:
                    print(f"MoE routed experts, {r['tokens']:>4} tokens: kernel {r['ms']['kernel']:6.3f} ms  oneDNN "
                          f"per expert {r['ms']['onednn']:6.3f} ms  ({r['speedup']:.2f}x)"
                          f"{'' if r['correct'] else '  WRONG'}")
        if cpu_kernels.fp32_available():
            res["fp32_linear_one_row"] = [linear_row_fp32(s) for s in SHAPES]
            for r in res["fp32_linear_one_row"]:
                u, g = r["us"], r["GB_s"]
                print(f"fp32 {r['shape'][0]:>6} x {r['shape'][1]:<5} gemv_fp32 (bf16 copy) {u['gemv_fp32']:7.1f} us "
                      f"{g['gemv_fp32']:5.1f} GB/s  F.linear fp32 {u['F.linear_fp32']:7.1f} us "
                      f"{g['F.linear_fp32']:5.1f} GB/s  ({r['speedup']:.2f}x)"
                      f"{'' if r['gemv_fp32_correct'] else '  WRONG'}")
            # a few rows (decode batches, a routed expert's tokens): up to bf16_weights.FEW_ROWS take the copies
            res["fp32_linear_few_rows"] = [linear_row_fp32(s, rows) for s in SHAPES[:3:2]
                                           for rows in (2, 4, 8, 16, 32, 64, 128)]
            for r in res["fp32_linear_few_rows"]:
                u = r["us"]
                print(f"fp32 {r['shape'][0]:>6} x {r['shape'][1]:<5} {r['rows']:>2} rows: gemv_fp32 "
                      f"{u['gemv_fp32']:7.1f} us  F.linear fp32 {u['F.linear_fp32']:7.1f} us  ({r['speedup']:.2f}x)"
                      f"{'' if r['gemv_fp32_correct'] else '  WRONG'}")
            mla = MLA(ModelConfig.from_dict(K2_BENCH), 0)
            torch.nn.init.normal_(mla.kv_b_proj.weight, std=0.05)
            mla.kv_b_proj.weight.data = mla.kv_b_proj.weight.data.bfloat16().float()  # a bf16 checkpoint's weight
            mla.kv_b_proj = Bf16CopyLinear(mla.kv_b_proj)
            res["fp32_mla_decode"] = [attention_row_fp32(mla, c) for c in CONTEXTS + [32768]]
            for r in res["fp32_mla_decode"]:
                print(f"fp32 MLA decode, context {r['context']:>5}: kernel {r['us']['kernel']:7.1f} us  torch "
                      f"{r['us']['torch']:7.1f} us  ({r['speedup']:.2f}x){'' if r['correct'] else '  WRONG'}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
