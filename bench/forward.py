"""Prefill throughput: kimi's forward vs transformers' on the same weights, bf16 on CPU.

Builds a small Kimi Linear model and a small K2-style model in transformers, saves each, loads the directory with
kimi.load_model, checks the logits agree (fp32 and bf16), then times a full-sequence forward of both side by side
(interleaved repeats, median). Prints a table, then one JSON line.

    python bench/forward.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time

import torch

import kimi


def configs(quick: bool):
    import transformers

    common = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
                  num_attention_heads=8, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    layers = 4 if quick else 8
    kl = transformers.KimiLinearConfig(
        **common, num_hidden_layers=layers, num_experts=16, num_experts_per_token=2, first_k_dense_replace=1,
        q_lora_rank=None, linear_attn_config={
            "kda_layers": [i + 1 for i in range(layers) if i % 4 != 3],
            "full_attn_layers": [i + 1 for i in range(layers) if i % 4 == 3],
            "head_dim": 64, "num_heads": 8, "short_conv_kernel_size": 4})
    k2 = transformers.DeepseekV3Config(
        **common, num_hidden_layers=layers, n_routed_experts=16, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1, q_lora_rank=256, num_mtp_layers=0, max_position_embeddings=8192,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 256,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "rope_theta": 50000.0})
    return {"kimi_linear": (transformers.KimiLinearForCausalLM, kl), "k2": (transformers.DeepseekV3ForCausalLM, k2)}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller model and sequence, fewer repeats")
    ap.add_argument("--seq", type=int, default=None, help="tokens per prefill (default 1024, quick 256)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per side (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seq = args.seq or (256 if args.quick else 1024)
    repeats = args.repeats or (2 if args.quick else 3)
    torch.manual_seed(0)
    rows, results = [], {}
    for name, (cls, cfg) in configs(args.quick).items():
        with tempfile.TemporaryDirectory() as d:
            cls(cfg).save_pretrained(d)
            ref32 = cls.from_pretrained(d, dtype=torch.float32).eval()
            ours32 = kimi.load_model(d, dtype=torch.float32)
            ids = torch.randint(3, cfg.vocab_size, (1, seq))
            with torch.inference_mode():
                err32 = (ours32(ids[:, :128]) - ref32(ids[:, :128]).logits).abs().max().item()
            del ref32, ours32
            ref = cls.from_pretrained(d, dtype=torch.bfloat16).eval()
            ours = kimi.load_model(d, dtype=torch.bfloat16)
        with torch.inference_mode():
            a, b = ours(ids).float(), ref(ids).logits.float()
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            ours(ids[:, :64]), ref(ids[:, :64])  # warm up
            t_ours, t_ref = [], []
            for _ in range(repeats):  # interleave so machine noise hits both sides alike
                t_ours.append(timed(lambda: ours(ids), 1))
                t_ref.append(timed(lambda: ref(ids), 1))
        tok_ours, tok_ref = seq / statistics.median(t_ours), seq / statistics.median(t_ref)
        ok = err32 <= 1e-4  # bf16 argmax agreement is reported, not gated: MoE routing flips on near-ties
        results[name] = dict(tokens=seq, kimi_tok_s=round(tok_ours, 1), transformers_tok_s=round(tok_ref, 1),
                             speedup=round(tok_ours / tok_ref, 2) if ok else None, fp32_max_abs_err=err32,
                             bf16_argmax_agreement=round(agree, 4), correct=ok)
        rows.append((name, seq, tok_ours, tok_ref, tok_ours / tok_ref, err32, agree))
        del ref, ours
    print(f"prefill, bf16, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{'model':<12} {'tokens':>6} {'kimi tok/s':>11} {'HF tok/s':>9} {'speedup':>8} {'fp32 err':>9} {'argmax=':>8}")
    for name, s, a, b, r, e, g in rows:
        print(f"{name:<12} {s:>6} {a:>11.1f} {b:>9.1f} {r:>7.2f}x {e:>9.1e} {g:>8.3f}")
    print(json.dumps({"bench": "forward", "dtype": "bfloat16", "device": "cpu", "results": results}))
    if not all(r["correct"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
