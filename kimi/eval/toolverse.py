"""`kimi eval toolverse`: score a model on the held-out toolverse splits (../shared/reference/synthetic.md §A6).

Two modes, both greedy:
  teacher-forced  the gold history up to each assistant turn, one generated turn, compared with the gold turn;
  closed-loop     the model talks to the simulated user: its calls are run by the real tools on the episode's
                  world and fed back (at most MAX_STEPS assistant turns per user turn).

Turn metrics (teacher-forced, micro-averaged): parse (the K2 grammar holds and the turn ended), json (call
arguments are a JSON object), schema (declared tool, arguments fit its schema), tool (multiset of names equals
gold), args (multiset of (name, canonical arguments) equals gold), f1 (call-set F1 on parallel turns), id
(`functions.{name}:{idx}` with the conversation's global idx), call precision / recall / accuracy of the
call-vs-no-call decision, answer_em (whitespace-normalised exact answer), slot (every answer slot present).
Episode metrics (closed-loop): success (every required call made, no call where none belongs, each answer
holds its slots, final database state equal to gold), calls_over_gold, and parse/json/schema rates of every
generated turn. Backends: a model directory through kimi's engine, or any OpenAI-compatible URL.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter, defaultdict

from kimi.data.schema import check_arguments
from kimi.data.synth import EVAL_SPLITS, episode
from kimi.data.tools import dump, execute

MAX_STEPS = 4
_SPECIAL = re.compile(r"<\|[a-z_]+\|>|</?think>")
_CALL = r"<\|tool_call_begin\|>[^<]+<\|tool_call_argument_begin\|>[^<]*<\|tool_call_end\|>"
_GRAMMAR = re.compile(rf"(?:<think>[^<]*</think>)?([^<]*)(?:<\|tool_calls_section_begin\|>(?:{_CALL})+"
                      rf"<\|tool_calls_section_end\|>)?")


class Completion:
    """One generated assistant turn: content, calls [(id, name, raw arguments)], and whether it parsed."""

    def __init__(self, content: str, calls: list, parse_ok: bool):
        self.content, self.calls, self.parse_ok = content, calls, parse_ok

    def message(self) -> dict:
        m = {"role": "assistant", "content": self.content or None}
        if self.calls:
            m["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                               for i, n, a in self.calls]
        return m


class EngineBackend:
    """A model directory run by kimi's offline engine; the completion is parsed by kimi's parser."""

    def __init__(self, model_dir, dtype: str | None = "float32", max_tokens: int = 160, max_num_seqs: int = 64):
        from kimi.engine.engine import LLM
        from kimi.engine.sampling_params import SamplingParams

        self.llm = LLM(str(model_dir), dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=4096,
                       cache_memory=256 << 20)
        if self.llm.tokenizer is None:
            raise ValueError(f"{model_dir}: no tokenizer (tiktoken.model) in the model directory")
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)
        self.name = str(model_dir)

    def complete(self, requests: list) -> list[Completion]:
        from kimi.tokenizer.chat import render_ids
        from kimi.tokenizer.parser import parse

        tok = self.llm.tokenizer
        prompts = [render_ids(m, tok, tools=t, add_generation_prompt=True)[0] for m, t in requests]
        out = []
        for r in self.llm.generate(prompts, self.params):
            ids = [i for i in r.token_ids if i not in self.llm.stop_ids]
            text = tok.decode(ids)
            p = parse(text)
            ok = r.finish_reason == "stop" and _GRAMMAR.fullmatch(text) is not None and \
                _SPECIAL.search(p.content) is None
            out.append(Completion(p.content, [(c.id, c.name, c.arguments) for c in p.tool_calls], ok))
        return out


class URLBackend:
    """Any OpenAI-compatible /v1/chat/completions endpoint (tools, temperature 0), called from a thread pool."""

    def __init__(self, url: str, model: str | None = None, max_tokens: int = 160, workers: int = 8,
                 timeout: float = 120):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions"
        self.model, self.max_tokens, self.workers, self.timeout = model, max_tokens, workers, timeout
        self.name = url

    def _one(self, request) -> Completion:
        import urllib.error
        import urllib.request

        messages, tools = request
        body = {"messages": messages, "tools": tools, "temperature": 0, "max_tokens": self.max_tokens}
        if self.model:
            body["model"] = self.model
        req = urllib.request.Request(self.url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as f:
                choice = json.loads(f.read())["choices"][0]
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as e:
            return Completion(f"[request failed: {e}]", [], False)
        m = choice.get("message") or {}
        calls = [(c.get("id", ""), c["function"]["name"], c["function"].get("arguments", ""))
                 for c in m.get("tool_calls") or []]
        return Completion(m.get("content") or "", calls, choice.get("finish_reason") in ("stop", "tool_calls"))

    def complete(self, requests: list) -> list[Completion]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self._one, requests))


def _canonical(raw: str):
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":")) if isinstance(value, dict) else None


def _norm(text: str) -> str:
    return " ".join((text or "").split())


def _final_turn_slots(ep) -> dict:
    """Message index of each user turn's last assistant message -> that turn's answer slots."""
    slots, turn = {}, -1
    for i, m in enumerate(ep.messages):
        if m["role"] == "user":
            turn += 1
        elif m["role"] == "assistant" and not m.get("tool_calls"):
            slots[i] = ep.turns[turn].slots
    return slots


def _score_calls(stats: Counter, ep, calls) -> None:
    """json / schema rates over every generated call."""
    decls = {t["function"]["name"]: t["function"] for t in ep.tools}
    for _, name, raw in calls:
        stats["calls"] += 1
        try:
            args = json.loads(raw)
        except ValueError:
            continue
        if isinstance(args, dict):
            stats["json"] += 1
            if name in decls and check_arguments(args, decls[name]["parameters"]) is None:
                stats["schema"] += 1


def teacher_forced(backend, episodes) -> dict:
    """Per-family Counters of turn metrics."""
    jobs = []
    for ep in episodes:
        slots = _final_turn_slots(ep)
        for i, m in enumerate(ep.messages):
            if m["role"] == "assistant":
                jobs.append((ep, i, slots.get(i)))
    completions = backend.complete([(ep.messages[:i], ep.tools) for ep, i, _ in jobs])
    stats = defaultdict(Counter)
    for (ep, i, slots), c in zip(jobs, completions):
        s = stats[ep.family]
        gold = ep.messages[i]
        gold_calls = [(g["id"], g["function"]["name"], g["function"]["arguments"])
                      for g in gold.get("tool_calls") or []]
        s["turns"] += 1
        s["parse"] += c.parse_ok
        _score_calls(s, ep, c.calls)
        pred_call, gold_call = bool(c.calls), bool(gold_calls)
        s["tp"] += pred_call and gold_call
        s["fp"] += pred_call and not gold_call
        s["fn"] += gold_call and not pred_call
        s["decision_ok"] += pred_call == gold_call
        if gold_calls:
            s["call_turns"] += 1
            s["tool"] += Counter(n for _, n, _ in c.calls) == Counter(n for _, n, _ in gold_calls)
            pred = Counter((n, _canonical(a)) for _, n, a in c.calls)
            want = Counter((n, _canonical(a)) for _, n, a in gold_calls)
            s["args"] += pred == want
            s["id"] += [i_ for i_, _, _ in c.calls] == [i_ for i_, _, _ in gold_calls]
            if len(gold_calls) > 1:
                hit = sum((pred & want).values())
                p, r = hit / max(1, sum(pred.values())), hit / sum(want.values())
                s["f1_turns"] += 1
                s["f1_sum"] += 2 * p * r / (p + r) if hit else 0.0
        else:
            s["text_turns"] += 1
            s["answer_em"] += _norm(c.content) == _norm(gold.get("content"))
            s["slot"] += bool(slots is not None and all(x in c.content for x in slots))
    return stats


def _run_call(ep, world, name, raw) -> tuple[dict, tuple | None]:
    """Execute one model call on the episode's world: (result, (canonical tool, canonical args) or None)."""
    b = ep.bindings.get(name)
    if b is None:
        return {"error": f"unknown tool {name}"}, None
    try:
        args = json.loads(raw)
    except ValueError:
        return {"error": "arguments are not valid JSON"}, None
    decl = next(t["function"] for t in ep.tools if t["function"]["name"] == name)
    problem = check_arguments(args, decl["parameters"])
    if problem:
        return {"error": problem}, None
    canonical = {b.params[k]: v for k, v in args.items()}
    return execute(world, b.tool, canonical), (b.tool, dump(canonical))


def _episode_loop(ep, stats: Counter):
    """A coroutine: yields (messages, tools), receives a Completion; returns when the episode is over."""
    world = ep.world()
    messages = [m for m in ep.messages[:next(i for i, m in enumerate(ep.messages) if m["role"] == "user")]]
    ok, n_calls = True, 0
    n_gold = sum(len(m.get("tool_calls") or []) for m in ep.messages)
    for turn in ep.turns:
        messages.append({"role": "user", "content": turn.user})
        made, final = [], None
        for _ in range(MAX_STEPS):
            c = yield messages, ep.tools
            stats["turns"] += 1
            stats["parse"] += c.parse_ok
            _score_calls(stats, ep, c.calls)
            if not c.calls:
                messages.append(c.message())
                final = c.content
                break
            if any(_canonical(raw) is None for _, _, raw in c.calls):
                # arguments that are not a JSON object cannot go back into a Kimi prompt: the episode fails here
                stats["episodes"] += 1
                return
            messages.append(c.message())
            for call_id, name, raw in c.calls:
                result, key = _run_call(ep, world, name, raw)
                made.append(key)
                messages.append({"role": "tool", "tool_call_id": call_id, "content": dump(result)})
        n_calls += len(made)
        turn_ok = (final is not None and all(r in made for r in turn.required)
                   and (turn.expects_call or not made) and all(s in final for s in turn.slots))
        ok = ok and turn_ok
    stats["episodes"] += 1
    stats["success"] += ok and world.tables == ep.final_state
    stats["calls_made"] += n_calls
    stats["calls_gold"] += n_gold


def closed_loop(backend, episodes) -> dict:
    """Run every episode's conversation with the model, all episodes batched in lockstep."""
    stats = defaultdict(Counter)
    live = []
    for ep in episodes:
        loop = _episode_loop(ep, stats[ep.family])
        live.append((loop, next(loop)))
    while live:
        completions = backend.complete([req for _, req in live])
        nxt = []
        for (loop, _), c in zip(live, completions):
            try:
                nxt.append((loop, loop.send(c)))
            except StopIteration:
                pass
        live = nxt
    return stats


def _ratio(a, b):
    return round(a / b, 4) if b else None


def summarize(tf: Counter | None, cl: Counter | None) -> dict:
    out = {}
    if tf:
        p, r = _ratio(tf["tp"], tf["tp"] + tf["fp"]), _ratio(tf["tp"], tf["tp"] + tf["fn"])
        out.update({"tf_turns": tf["turns"], "parse": _ratio(tf["parse"], tf["turns"]),
                    "json": _ratio(tf["json"], tf["calls"]), "schema": _ratio(tf["schema"], tf["calls"]),
                    "tool": _ratio(tf["tool"], tf["call_turns"]), "args": _ratio(tf["args"], tf["call_turns"]),
                    "f1": _ratio(tf["f1_sum"], tf["f1_turns"]), "id": _ratio(tf["id"], tf["call_turns"]),
                    "call_precision": p, "call_recall": r, "call_acc": _ratio(tf["decision_ok"], tf["turns"]),
                    "answer_em": _ratio(tf["answer_em"], tf["text_turns"]),
                    "slot": _ratio(tf["slot"], tf["text_turns"])})
    if cl:
        out.update({"episodes": cl["episodes"], "success": _ratio(cl["success"], cl["episodes"]),
                    "cl_parse": _ratio(cl["parse"], cl["turns"]), "cl_json": _ratio(cl["json"], cl["calls"]),
                    "cl_schema": _ratio(cl["schema"], cl["calls"]),
                    "calls_over_gold": _ratio(cl["calls_made"], cl["calls_gold"])})
    return out


def evaluate(backend, splits=("iid",), n: int = 100, mode: str = "both", start: int = 0) -> dict:
    """{split: {"all": metrics, "families": {family: metrics}}}."""
    if mode not in ("both", "closed", "teacher"):
        raise ValueError(f"mode {mode!r}: expected both, closed or teacher")
    for s in splits:
        if s not in EVAL_SPLITS:
            raise ValueError(f"unknown evaluation split {s!r}; expected one of {', '.join(EVAL_SPLITS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"episodes per split must be an int >= 1, got {n!r}")
    results = {}
    for split in splits:
        episodes = [episode(split, i) for i in range(start, start + n)]
        tf = teacher_forced(backend, episodes) if mode in ("both", "teacher") else {}
        cl = closed_loop(backend, episodes) if mode in ("both", "closed") else {}
        families = sorted(set(tf) | set(cl))
        total_tf, total_cl = sum(tf.values(), Counter()), sum(cl.values(), Counter())
        results[split] = {"all": summarize(total_tf, total_cl),
                          "families": {f: summarize(tf.get(f), cl.get(f)) for f in families}}
    return results


COLUMNS = ("success", "parse", "json", "schema", "tool", "args", "f1", "id", "call_acc", "call_precision",
           "call_recall", "answer_em", "slot", "cl_parse", "cl_json", "calls_over_gold")


def _cell(column, value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if column == "calls_over_gold" else f"{100 * value:.1f}"


def table(results: dict) -> str:
    """Percentages per split and family (calls_over_gold as a ratio)."""
    head = f"{'split':<14}{'family':<11}{'n':>5}" + "".join(f"{c[:9]:>10}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for split, r in results.items():
        for fam, m in [("all", r["all"]), *r["families"].items()]:
            n = m.get("episodes", m.get("tf_turns", 0))
            cells = "".join(f"{_cell(c, m.get(c)):>10}" for c in COLUMNS)
            lines.append(f"{split if fam == 'all' else '':<14}{fam:<11}{n:>5}{cells}")
    return "\n".join(lines)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="SUITE")
    t = sub.add_parser("toolverse", help="tool-use evaluation on the held-out toolverse splits")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model directory run by kimi's engine (default: the built-in model)")
    src.add_argument("--url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    t.add_argument("--api-model", default=None, help="with --url: the `model` field of each request")
    t.add_argument("--splits", nargs="+", default=["iid"], choices=[*EVAL_SPLITS, "all"], help="splits to run")
    t.add_argument("--n", type=int, default=200, help="episodes per split")
    t.add_argument("--start", type=int, default=0, help="first episode index of each split")
    t.add_argument("--mode", default="both", choices=["both", "closed", "teacher"],
                   help="closed-loop, teacher-forced, or both")
    t.add_argument("--max-tokens", type=int, default=160, help="token limit of one generated assistant turn")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="engine compute dtype")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    t.set_defaults(func=toolverse_main)


def toolverse_main(args) -> None:
    if args.url:
        backend = URLBackend(args.url, args.api_model, args.max_tokens)
    else:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        model = args.model
        if model is None:
            from kimi.builtin import builtin_model_dir

            model = builtin_model_dir()
        backend = EngineBackend(model, args.dtype, args.max_tokens)
    splits = list(EVAL_SPLITS) if "all" in args.splits else args.splits
    t0 = time.perf_counter()
    results = evaluate(backend, splits, args.n, args.mode, args.start)
    seconds = time.perf_counter() - t0
    print(table(results))
    print(f"\n{backend.name}: {len(splits)} split(s) x {args.n} episodes, {args.mode}, greedy, {seconds:.0f} s",
          file=sys.stderr)
    print(json.dumps({"suite": "toolverse", "model": backend.name, "mode": args.mode, "n": args.n,
                      "seconds": round(seconds, 1), "splits": results}))


if __name__ == "__main__":  # python -m kimi.eval.toolverse toolverse ...: the same as `kimi eval toolverse ...`
    parser = argparse.ArgumentParser(prog="kimi eval", description=__doc__.split("\n")[0])
    add_eval_arguments(parser)
    parsed = parser.parse_args()
    parsed.func(parsed)
