"""Prometheus metrics in the text exposition format, named like vLLM's (`vllm:` becomes
`fastserve:`) so existing dashboards need only the prefix changed.

Counters and histograms are updated by the request handlers on the event loop (one thread, so
no locks); gauges of engine state are read from `engine.stats()` at scrape time."""

from __future__ import annotations

import bisect
import math

PREFIX = "fastserve:"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                40.0, 50.0, 60.0, 120.0, 240.0)


def _fmt(v: float) -> str:
    f = float(v)
    if f == math.inf:
        return "+Inf"
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(d: dict[str, str]) -> str:
    if not d:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in d.items()) + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: dict[str, str]) -> list[str]:
        lines, cumulative = [], 0
        for bound, c in zip(self.buckets + (math.inf,), self.counts):
            cumulative += c
            lines.append(f"{name}_bucket{_labels({**labels, 'le': _fmt(bound)})} {cumulative}")
        lines.append(f"{name}_sum{_labels(labels)} {_fmt(self.sum)}")
        lines.append(f"{name}_count{_labels(labels)} {self.count}")
        return lines


FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.labels = {"model_name": model_name}
        self.request_success = {r: 0 for r in FINISH_REASONS}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.http_requests: dict[tuple[str, int], int] = {}
        self.ttft = Histogram(_TTFT_BUCKETS)
        self.itl = Histogram(_ITL_BUCKETS)
        self.e2e = Histogram(_E2E_BUCKETS)

    def count_http(self, route: str, status: int) -> None:
        key = (route, status)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def finished(self, reason: str | None, e2e_seconds: float) -> None:
        reason = reason if reason in self.request_success else "abort"
        self.request_success[reason] += 1
        self.e2e.observe(e2e_seconds)

    def render(self, stats: dict | None) -> str:
        out: list[str] = []
        lab = self.labels

        def metric(name, kind, help_, samples):
            full = PREFIX + name
            out.append(f"# HELP {full} {help_}")
            out.append(f"# TYPE {full} {kind}")
            for labels, value in samples:
                out.append(f"{full}{_labels({**lab, **labels})} {_fmt(value)}")

        def hist(name, help_, h: Histogram):
            full = PREFIX + name
            out.append(f"# HELP {full} {help_}")
            out.append(f"# TYPE {full} histogram")
            out.extend(h.render(full, lab))

        s = stats or {}
        queried = s.get("prefix_cache_queried_tokens", 0)
        hits = s.get("prefix_cache_hit_tokens", 0)
        metric("num_requests_running", "gauge", "Requests in the engine's running set.",
               [({}, s.get("num_running", 0))])
        metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
               [({}, s.get("num_waiting", 0))])
        metric("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0 to 1).",
               [({}, s.get("kv_cache_usage", 0.0))])
        metric("num_free_blocks", "gauge", "Free KV-cache blocks.",
               [({}, s.get("num_free_blocks", 0))])
        metric("num_total_blocks", "gauge", "KV-cache blocks in the pool.",
               [({}, s.get("num_total_blocks", 0))])
        metric("num_preemptions_total", "counter", "Requests preempted for lack of KV blocks.",
               [({}, s.get("num_preemptions", 0))])
        metric("prefix_cache_queries_total", "counter",
               "Prompt tokens looked up in the prefix cache.", [({}, queried)])
        metric("prefix_cache_hits_total", "counter",
               "Prompt tokens served from the prefix cache.", [({}, hits)])
        metric("prefix_cache_hit_rate", "gauge",
               "Prefix-cache hits over queries since start (0 when nothing was queried).",
               [({}, hits / queried if queried else 0.0)])
        metric("request_success_total", "counter", "Finished requests by finish reason.",
               [({"finished_reason": r}, c) for r, c in self.request_success.items()])
        metric("prompt_tokens_total", "counter", "Prompt tokens processed.",
               [({}, self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated.",
               [({}, self.generation_tokens)])
        hist("time_to_first_token_seconds", "Time from request arrival to its first token.",
             self.ttft)
        hist("inter_token_latency_seconds", "Time between successive output tokens.", self.itl)
        hist("e2e_request_latency_seconds", "Time from request arrival to its last token.",
             self.e2e)
        metric("http_requests_total", "counter", "HTTP requests by route and status.",
               [({"route": r, "status": str(st)}, c)
                for (r, st), c in sorted(self.http_requests.items())])
        return "\n".join(out) + "\n"
