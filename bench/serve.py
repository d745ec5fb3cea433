"""How much does the HTTP server cost over the engine, and how steady is streaming under load?

One process, side by side: the engine's offline throughput (LLM.generate on the batch shape of the top concurrency
level), then the same engine behind `kimi serve` on loopback driven by an async streaming load generator at each
concurrency level (random token prompts, ignore_eos, /v1/completions), with metrics defined as `vllm bench serve`
defines them: TTFT = send -> first chunk with text; ITL = gaps between consecutive chunks (pooled over requests);
TPOT = (E2E - TTFT) / (output tokens - 1) per request; output tok/s = all output tokens / wall time.
Correctness in the same run: a greedy request through the server must return exactly the offline engine's text.
Optional soak (--soak-seconds): 32 clients loop, one in four hanging up mid-stream; afterwards no errors, every
cache block and state slot free, and resident memory compared with the start. The load generator runs in a child
process; on a 2-core machine it still competes with the server for CPU, so CPU numbers are an upper bound on overhead.

    python bench/serve.py                              # demo model, 512 in / 128 out, concurrency 1 8 32
    python bench/serve.py --soak-seconds 600           # plus the 10-minute soak
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402

from kimi.engine.engine import LLM  # noqa: E402
from kimi.engine.sampling_params import SamplingParams  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client, url, prompt, max_tokens, hang_up_after=None):
    t0 = time.perf_counter()
    ttft, last, gaps, n_out, text = None, None, [], 0, []
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"error": ev["error"]["message"]}
            if ev.get("usage"):
                n_out = ev["usage"]["completion_tokens"]
            for c in ev["choices"]:
                if c.get("text"):
                    t = time.perf_counter()
                    if ttft is None:
                        ttft = t - t0
                    else:
                        gaps.append(t - last)
                    last = t
                    text.append(c["text"])
                    chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                return {"hung_up": True}
    e2e = time.perf_counter() - t0
    tpot = (e2e - ttft) / (n_out - 1) if n_out > 1 and ttft is not None else None
    return {"ttft": ttft, "itl": gaps, "e2e": e2e, "tpot": tpot, "out": n_out, "text": "".join(text)}


async def load(url, prompts, max_tokens, concurrency):
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def run(p):
            async with sem:
                return await one_request(client, url, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(p) for p in prompts))
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    itl = [g for r in ok for g in r["itl"]]
    return {"concurrency": concurrency, "requests": len(prompts), "errors": len(errors), "first_error": errors[:1],
            "wall_s": wall, "output_tok_s": sum(r["out"] for r in ok) / wall,
            "ttft_p50_ms": 1e3 * pct([r["ttft"] for r in ok], 50),
            "ttft_p99_ms": 1e3 * pct([r["ttft"] for r in ok], 99),
            "tpot_p50_ms": 1e3 * pct([r["tpot"] for r in ok if r["tpot"]], 50),
            "tpot_p99_ms": 1e3 * pct([r["tpot"] for r in ok if r["tpot"]], 99),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99)}


async def soak(url, make_prompt, max_tokens, clients, seconds):
    stop_at = time.time() + seconds
    counts = {"done": 0, "hung_up": 0, "errors": 0, "first_error": None}
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(k):
            rng = random.Random(k)
            while time.time() < stop_at:
                hang = rng.randint(1, max(1, max_tokens // 2)) if rng.random() < 0.25 else None
                r = await one_request(client, url, make_prompt(rng), max_tokens, hang)
                if "error" in r:
                    counts["errors"] += 1
                    counts["first_error"] = counts["first_error"] or r["error"]
                else:
                    counts["hung_up" if r.get("hung_up") else "done"] += 1

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return counts


def client_main(url, concurrency, per_level, input_len, output_len, vocab, soak_seconds):
    rng = random.Random(1)

    def prompt(r=rng):
        return [r.randrange(vocab) for _ in range(input_len)]

    levels = [asyncio.run(load(url, [prompt() for _ in range(per_level * c)], output_len, c)) for c in concurrency]
    soak_result = asyncio.run(soak(url, prompt, output_len, 32, soak_seconds)) if soak_seconds > 0 else None
    return levels, soak_result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the demo model)")
    ap.add_argument("--demo-dir", default="runs/demo", help="where the demo model is built when --model is absent")
    ap.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens per request (ignore_eos)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    ap.add_argument("--requests-per-level", type=int, default=2, help="requests per level = this x concurrency")
    ap.add_argument("--soak-seconds", type=float, default=0, help="run the soak for this long (0 = skip)")
    ap.add_argument("--dtype", default="float32", help="model dtype on CPU (bfloat16 on a GPU)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="engine token budget per step (smaller: prefill chunks stall decode steps less)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    args = ap.parse_args()

    import socket
    import threading

    import uvicorn

    from kimi.server.app import ServerState, build_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if device == "cpu" else "bfloat16"
    if args.model is None:
        from kimi.demo import ensure_demo_model

        args.model = str(ensure_demo_model(args.demo_dir))
    top = max(args.concurrency)
    max_len = args.input_len + args.output_len + 8
    llm = LLM(args.model, dtype=dtype, device=device, max_num_seqs=max(top, 8), max_model_len=max_len,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    vocab = llm.tokenizer.n_base  # ordinary tokens only: random specials would read as chat control
    rng = random.Random(0)

    def make_prompt(r=rng):
        return [r.randrange(vocab) for _ in range(args.input_len)]

    # offline: the engine alone on the top level's workload (the same number of requests, all at once)
    prompts = [make_prompt() for _ in range(args.requests_per_level * top)]
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    # The engine's background loop drives the offline run too: on these machines stepping from the main thread
    # measured several times slower (CPU thread-pool behaviour), which would flatter the server.
    llm.start()
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up: same batch shapes
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    offline_s = time.perf_counter() - t0
    offline_tok_s = sum(len(o.token_ids) for o in outs) / offline_s
    probe = make_prompt()
    reference = llm.generate([probe], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].text

    state = ServerState("bench")
    state.set_engine(llm)
    app = build_app(state)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"

    got = httpx.post(url + "/v1/completions", json={"prompt": probe, "max_tokens": 16, "temperature": 0,
                                                    "ignore_eos": True}, timeout=600).json()
    correct = got["choices"][0]["text"] == reference
    # the load generator runs in its own process (as `vllm bench serve` does), so its Python work does not
    # share the server's GIL; the soak's memory and cache checks read this (the server's) process
    import concurrent.futures
    import multiprocessing

    rss_before = rss_mib()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        levels, soak_result = pool.submit(client_main, url, args.concurrency, args.requests_per_level,
                                          args.input_len, args.output_len, vocab, args.soak_seconds).result()
    if soak_result is not None:
        time.sleep(1.0)
        stats = state.engine.stats()
        soak_result.update(rss_before_mib=rss_before, rss_after_mib=rss_mib(), blocks_used_after=stats["blocks_used"],
                           state_slots_used_after=stats["state_slots_used"], in_flight_after=state.engine.in_flight)
    server.should_exit = True
    state.engine.shutdown()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {device}"
    if device == "cuda":
        machine += f" ({torch.cuda.get_device_name()})"
    print(f"kimi serve vs engine offline — {machine}; {args.input_len} in / {args.output_len} out, ignore_eos")
    print(f"offline engine, {len(prompts)} prompts at once: {offline_tok_s:.1f} output tok/s")
    print(f"greedy output through the server equals the offline engine's: {correct}")
    print(f"{'conc':>5} {'reqs':>5} {'err':>4} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} "
          f"{'p99':>8} {'ITL p50':>8} {'p99':>8}  (ms)")
    for r in levels:
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['errors']:>4} {r['output_tok_s']:>10.1f} "
              f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>8.1f} {r['tpot_p50_ms']:>9.1f} {r['tpot_p99_ms']:>8.1f} "
              f"{r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f}")
    at_top = next(r for r in levels if r["concurrency"] == top)
    overhead = 1 - at_top["output_tok_s"] / offline_tok_s
    itl_ratio = at_top["itl_p99_ms"] / at_top["itl_p50_ms"] if at_top["itl_p50_ms"] > 0 else float("nan")
    print(f"server overhead at concurrency {top}: {100 * overhead:.1f}% of offline throughput (target <= 10%)")
    print(f"p99 / p50 inter-token latency at concurrency {top}: {itl_ratio:.2f} (target <= 3)")
    if soak_result:
        print(f"soak {args.soak_seconds:.0f}s, 32 clients: {soak_result}")
    result = {"bench": "serve", "machine": machine, "input_len": args.input_len, "output_len": args.output_len,
              "correct": correct, "offline_output_tok_s": offline_tok_s, "levels": levels, "soak": soak_result}
    if correct:  # no speed claims from a run whose correctness check failed
        result.update(overhead_at_top=overhead, itl_p99_over_p50_at_top=itl_ratio)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
