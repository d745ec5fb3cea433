"""Prometheus metrics for `kimi serve`, written in the text exposition format (version 0.0.4) by hand.

Counters and histograms are updated by the request handlers; gauges (running/waiting requests, cache blocks,
state slots, prefix-cache hit rate) are read from `LLMEngine.stats()` at scrape time. Names use the `kimi:`
prefix the way vLLM uses `vllm:`. Times are in seconds.
"""

from __future__ import annotations

import bisect
import threading

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets=_LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            total += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, finish reason or http status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0
        self.invalid_tool_calls = 0
        self.ttft = Histogram("kimi:time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = Histogram("kimi:inter_token_latency_seconds", "Time between two consecutive streamed tokens.")
        self.e2e = Histogram("kimi:e2e_request_latency_seconds", "Time from request arrival to its last token.")

    def request_done(self, endpoint: str, outcome: str, prompt_tokens: int = 0, generation_tokens: int = 0,
                     cached_tokens: int = 0, ttft: float | None = None, total: float | None = None) -> None:
        with self._lock:
            key = (endpoint, outcome)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            self.cached_tokens += cached_tokens
            if ttft is not None:
                self.ttft.observe(ttft)
            if total is not None:
                self.e2e.observe(total)

    def token_gaps(self, gaps: list[float]) -> None:
        with self._lock:
            for g in gaps:
                self.itl.observe(g)

    def render(self, stats: dict | None) -> str:
        with self._lock:
            lines = ["# HELP kimi:requests_total Requests handled, by endpoint and outcome.",
                     "# TYPE kimi:requests_total counter"]
            for (endpoint, outcome), n in sorted(self.requests.items()):
                lines.append(f'kimi:requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {n}')
            for name, value, help in (
                    ("kimi:prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
                    ("kimi:generation_tokens_total", self.generation_tokens, "Generated tokens."),
                    ("kimi:prompt_cached_tokens_total", self.cached_tokens,
                     "Prompt tokens served from the prefix cache."),
                    ("kimi:invalid_tool_calls_total", self.invalid_tool_calls,
                     "Tool calls whose arguments did not parse or validate.")):
                lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
            for h in (self.ttft, self.itl, self.e2e):
                lines += h.render()
        if stats is not None:
            for name, value, help in (
                    ("kimi:num_requests_running", stats["running"], "Sequences being computed."),
                    ("kimi:num_requests_waiting", stats["waiting"], "Sequences waiting for cache space or a slot."),
                    ("kimi:cache_blocks_used", stats["blocks_used"], "Paged latent-cache blocks in use."),
                    ("kimi:cache_blocks_capacity", stats["blocks_total"], "Paged latent-cache blocks."),
                    ("kimi:cache_usage_ratio", stats["blocks_used"] / max(stats["blocks_total"], 1),
                     "Fraction of latent-cache blocks in use."),
                    ("kimi:state_slots_used", stats["state_slots_used"], "KDA state slots in use."),
                    ("kimi:state_slots_capacity", stats["state_slots_total"], "KDA state slots."),
                    ("kimi:prefix_cache_hit_rate", stats["prefix_cache_hit_rate"],
                     "Prompt tokens found in the prefix cache / prompt tokens looked up."),
                    ("kimi:num_preemptions_total", stats["num_preemptions"], "Sequences preempted (recomputed).")):
                kind = "counter" if name.endswith("_total") else "gauge"
                lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
