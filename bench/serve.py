"""How much does the HTTP server cost over the engine, and how steady is streaming under load?

One process, side by side: the engine's offline throughput (LLM.generate on exactly the top level's requests,
before and again after the server levels), then the same engine, same settings, behind `kimi serve` on loopback,
driven by an async streaming load generator at each concurrency level (random token prompts, ignore_eos,
/v1/completions), with metrics defined as `vllm bench serve` defines them: TTFT = send -> first chunk; ITL = gaps
between consecutive chunks (pooled over requests); TPOT = (E2E - TTFT) / (output tokens - 1) per request;
output tok/s = all output tokens / wall time. Correctness in the same run: a greedy request through the server must
return exactly the offline engine's text.
Optional soak (--soak-seconds): 32 clients loop, one in four hanging up mid-stream; afterwards no errors, every
cache block and state slot free, and the server's resident memory sampled through the run. The load generator runs
in a child process; on a small machine it shares the cores with the server, so both processes' CPU use is printed.
On CPU the engine gets cpus - 1 intra-op threads (--threads), leaving a core to the HTTP loop and the load
generator: with a pool spanning every core, each step waits for whichever of its threads the OS has descheduled.
The step budget defaults to the pace at which prefill keeps up with decoding (see main). To tell where latency and
overhead come from, the engine's own step times (LLMEngine.step_log) are printed beside the clients' ITL, offline and
served, with the CPU seconds the forwards, the rest of the server process and the load generator spent.

    python bench/serve.py                              # demo model, 512 in / 128 out, concurrency 1 8 32
    python bench/serve.py --soak-seconds 600           # plus the 10-minute soak
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
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
            if ev["choices"]:  # a chunk, even when its text is empty (held-back bytes), as vllm bench serve counts
                t = time.perf_counter()
                if ttft is None:
                    ttft = t - t0
                else:
                    gaps.append(t - last)
                last = t
                text.extend(c.get("text") or "" for c in ev["choices"])
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

        t0, cpu0 = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(run(p) for p in prompts))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    itl = [g for r in ok for g in r["itl"]]
    return {"concurrency": concurrency, "requests": len(prompts), "errors": len(errors), "first_error": errors[:1],
            "wall_s": wall, "client_cpu": cpu / wall, "output_tok_s": sum(r["out"] for r in ok) / wall,
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


def step_summary(steps) -> dict:
    """The engine's own step times over a level (LLMEngine.step_log), to set beside the ITL clients measured: when
    the two distributions agree the tail comes from the steps themselves, when ITL is worse it comes from serving."""
    mixed = [d for _, d, _, _, prefill in steps if prefill]
    pure = [d for _, d, _, _, prefill in steps if not prefill]
    span = steps[-1][0] + steps[-1][1] - steps[0][0] if steps else float("nan")
    return {"steps": len(steps), "with_prefill": len(mixed), "forward_share": sum(s[1] for s in steps) / span,
            "forward_cpu_s": sum(s[2] for s in steps), "p50_ms": 1e3 * pct([s[1] for s in steps], 50),
            "p99_ms": 1e3 * pct([s[1] for s in steps], 99), "decode_only_p50_ms": 1e3 * pct(pure, 50),
            "with_prefill_p50_ms": 1e3 * pct(mixed, 50),
            "prefill_tokens_per_step": sum(s[4] for s in steps) / max(1, len(steps))}


def client_level(url, prompts, output_len, concurrency):
    return asyncio.run(load(url, prompts, output_len, concurrency))


def client_soak(url, input_len, output_len, vocab, clients, seconds):
    def prompt(r):
        return [r.randrange(vocab) for _ in range(input_len)]

    return asyncio.run(soak(url, prompt, output_len, clients, seconds))


def run_soak(pool, state, url, args, vocab) -> dict:
    """32 clients for args.soak_seconds, a quarter of them hanging up mid-stream. The server's resident memory is
    sampled throughout (the first sample before any soak traffic); cache use is read after the last request."""
    clients = 32
    rss = [rss_mib()]
    t0 = time.time()
    fut = pool.submit(client_soak, url, args.input_len, args.output_len, vocab, clients, args.soak_seconds)
    while True:
        try:
            counts = fut.result(timeout=max(1.0, args.soak_seconds / 40))
            break
        except concurrent.futures.TimeoutError:
            rss.append(rss_mib())
    time.sleep(1.0)  # the aborts of the last hung-up streams are applied at the engine's next step
    stats = state.engine.stats()
    rss.append(rss_mib())
    return {**counts, "clients": clients, "seconds": time.time() - t0, "rss_mib": rss,
            "blocks_used_after": stats["blocks_used"], "blocks_cached_after": stats["blocks_cached"],
            "snapshots_after": stats["snapshots_used"], "state_slots_used_after": stats["state_slots_used"],
            "in_flight_after": state.engine.in_flight, "running_after": stats["running"],
            "waiting_after": stats["waiting"]}


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
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="engine token budget per step; it bounds the prefill work a decode step carries (default: "
                         "the top concurrency x (input + output) / output, the pace at which prefill keeps up)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for the engine (default on CPU: cpus - 1, at least 1)")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="turn the prefix cache on, as `kimi serve` has it (random prompts never hit it, but the soak "
                         "then also cycles cached blocks and KDA snapshots through eviction)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    args = ap.parse_args()

    import multiprocessing
    import socket
    import threading

    import uvicorn

    from kimi.server.app import ServerState, build_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if device == "cpu" else "bfloat16"
    if args.threads is not None or device == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    if args.model is None:
        from kimi.demo import ensure_demo_model

        args.model = str(ensure_demo_model(args.demo_dir))
    top = max(args.concurrency)
    max_len = args.input_len + args.output_len + 8
    if args.max_num_batched_tokens is None:
        # In the steady state every stream needs input_len prefill tokens per output_len decode steps, so a step
        # carrying `top` decodes plus top * input_len / output_len prefill tokens keeps pace. A budget of that
        # size spreads the prefill evenly over the decode steps; a much larger one drains the queue in bursts of
        # long steps, and every stream then waits out each of them (bimodal inter-token latency). On CPU, where a
        # prefill token costs a sizeable fraction of a decode row, the spread decides the ITL tail.
        args.max_num_batched_tokens = -(-top * (args.input_len + args.output_len) // args.output_len)
    llm = LLM(args.model, dtype=dtype, device=device, max_num_seqs=max(top, 8), max_model_len=max_len,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.prefix_caching)
    vocab = llm.tokenizer.n_base  # ordinary tokens only: random specials would read as chat control
    rng = random.Random(0)

    def make_prompt():
        return [rng.randrange(vocab) for _ in range(args.input_len)]

    # offline: the engine alone on exactly the top level's requests, all queued at once; with max_num_seqs = top
    # that is the same closed loop as `top` streaming clients (a finished sequence's place goes to the next prompt)
    level_prompts = {c: [make_prompt() for _ in range(args.requests_per_level * c)] for c in args.concurrency}
    prompts = level_prompts[top]
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    # The engine's background loop drives the offline run too, as it drives the server.
    llm.step_log = collections.deque()  # every forward's timing, until the soak (which must hold nothing per step)
    llm.start()
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up: same batch shapes

    offline_tok_s, offline_cpu, offline_cpu_s, offline_steps = [], [], [], []  # tok / wall s, CPU s / wall s, ...

    def offline() -> None:
        t0, cpu0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        offline_tok_s.append(sum(len(o.token_ids) for o in outs) / wall)
        offline_cpu.append(cpu / wall)
        offline_cpu_s.append(cpu)
        offline_steps.append(step_summary([s for s in llm.step_log if s[0] >= t0]))

    offline()
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
    # The load generator runs in its own process (as `vllm bench serve` does), so its Python work does not share
    # the server's GIL. CPU use of both processes is CPU seconds per wall second (2.0 = two cores busy). The offline
    # run is repeated after the levels, so drift in the machine's load shows, and the overhead uses their mean.
    soak_result = None
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(time.sleep, 0).result()  # the child is up before anything is timed
        levels = []
        for c in args.concurrency:
            t0, cpu0 = time.perf_counter(), time.process_time()
            r = pool.submit(client_level, url, level_prompts[c], args.output_len, c).result()
            r["server_cpu_s"] = time.process_time() - cpu0
            r["server_cpu"] = r["server_cpu_s"] / (time.perf_counter() - t0)
            r["engine_steps"] = step_summary([s for s in llm.step_log if s[0] >= t0])
            levels.append(r)
        offline()
        if args.soak_seconds > 0:
            llm.step_log = None
            soak_result = run_soak(pool, state, url, args, vocab)
    server.should_exit = True
    state.engine.shutdown()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {device}"
    if device == "cuda":
        machine += f" ({torch.cuda.get_device_name()})"
    offline_mean = sum(offline_tok_s) / len(offline_tok_s)
    print(f"kimi serve vs engine offline — {machine}; {args.input_len} in / {args.output_len} out, ignore_eos")
    print(f"engine: {args.max_num_batched_tokens}-token step budget, max_num_seqs {max(top, 8)}, prefix cache "
          f"{'on' if args.prefix_caching else 'off'}, "
          f"{torch.get_num_threads()} torch threads; the load generator runs in a second process on this machine")
    print(f"offline engine, {len(prompts)} prompts at once: {offline_mean:.1f} output tok/s "
          f"(before the levels {offline_tok_s[0]:.1f}, after {offline_tok_s[1]:.1f}), CPU use "
          f"{offline_cpu[0]:.2f} and {offline_cpu[1]:.2f}")
    print(f"greedy output through the server equals the offline engine's: {correct}")
    print(f"{'conc':>5} {'reqs':>5} {'err':>4} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} "
          f"{'p99':>8} {'ITL p50':>8} {'p99':>8}  (ms)   CPU server  client")
    for r in levels:
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['errors']:>4} {r['output_tok_s']:>10.1f} "
              f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>8.1f} {r['tpot_p50_ms']:>9.1f} {r['tpot_p99_ms']:>8.1f} "
              f"{r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f}  {r['server_cpu']:>16.2f} {r['client_cpu']:>7.2f}")
    at_top = next(r for r in levels if r["concurrency"] == top)
    st = at_top["engine_steps"]
    for name, st in (("offline", offline_steps[0]), (f"served at concurrency {top}", at_top["engine_steps"])):
        print(f"engine steps {name}: {st['steps']}, {st['with_prefill']} carrying a prefill chunk "
              f"({st['prefill_tokens_per_step']:.0f} prefill tokens per step on average); step p50 {st['p50_ms']:.1f}"
              f" ms, p99 {st['p99_ms']:.1f} ms (decode-only p50 {st['decode_only_p50_ms']:.1f}, with prefill p50 "
              f"{st['with_prefill_p50_ms']:.1f}); forward + sampling {100 * st['forward_share']:.0f}% of the time, "
              f"{st['forward_cpu_s']:.1f} CPU s in them")
    overhead = 1 - at_top["output_tok_s"] / offline_mean
    itl_ratio = at_top["itl_p99_ms"] / at_top["itl_p50_ms"] if at_top["itl_p50_ms"] > 0 else float("nan")
    # the same comparison per CPU second spent in this process, which machine load (other processes taking the
    # cores) does not move as much as it moves wall-clock throughput
    offline_per_cpu = sum(offline_tok_s) / sum(offline_cpu)
    served_per_cpu = at_top["output_tok_s"] / at_top["server_cpu"]
    overhead_cpu = 1 - served_per_cpu / offline_per_cpu
    print(f"server overhead at concurrency {top}: {100 * overhead:.1f}% of offline throughput (target <= 10%); "
          f"per CPU second: {100 * overhead_cpu:.1f}% ({served_per_cpu:.0f} vs {offline_per_cpu:.0f} output tokens)")
    fwd_off, fwd_srv = offline_steps[0]["forward_cpu_s"], at_top["engine_steps"]["forward_cpu_s"]
    print(f"CPU seconds for the same {len(prompts)} requests: forward + sampling {fwd_off:.1f} offline, {fwd_srv:.1f} "
          f"served; the rest of the process (scheduling, detokenising; serving adds HTTP) "
          f"{offline_cpu_s[0] - fwd_off:.1f} offline, {at_top['server_cpu_s'] - fwd_srv:.1f} served; load generator "
          f"{at_top['client_cpu'] * at_top['wall_s']:.1f}")
    print(f"p99 / p50 inter-token latency at concurrency {top}: {itl_ratio:.2f} (target <= 3)")
    if soak_result:
        r, rss = soak_result, soak_result["rss_mib"]
        print(f"soak {r['seconds']:.0f} s, {r['clients']} clients: {r['done']} requests finished, {r['hung_up']} hung "
              f"up mid-stream, {r['errors']} errors; afterwards {r['blocks_used_after']} cache blocks, "
              f"{r['state_slots_used_after']} state slots and {r['in_flight_after']} sequences in use "
              f"({r['blocks_cached_after']} free blocks keep a prefix hash, {r['snapshots_after']} KDA snapshots); resident "
              f"memory {rss[0]:.0f} MiB before, {rss[len(rss) // 4]:.0f} a quarter in, {rss[-1]:.0f} after "
              f"(max {max(rss):.0f})")
    result = {"bench": "serve", "machine": machine, "input_len": args.input_len, "output_len": args.output_len,
              "budget": args.max_num_batched_tokens, "torch_threads": torch.get_num_threads(),
              "prefix_caching": args.prefix_caching, "correct": correct,
              "offline_output_tok_s": offline_mean, "offline_runs_tok_s": offline_tok_s, "offline_cpu": offline_cpu,
              "offline_cpu_s": offline_cpu_s, "offline_engine_steps": offline_steps,
              "levels": levels,
              "soak": soak_result}
    if correct:  # no speed claims from a run whose correctness check failed
        result.update(overhead_at_top=overhead, overhead_per_cpu_at_top=overhead_cpu,
                      itl_p99_over_p50_at_top=itl_ratio)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
