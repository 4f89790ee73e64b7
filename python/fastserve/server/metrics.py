"""Prometheus metrics in the text exposition format, twice: under fastserve's own names
(`fastserve:...`, labelled `model_name`) and under vLLM's exact names, types, labels
(`model_name`, `engine`) and histogram buckets (`vllm:...`, from vLLM's
`v1/metrics/loggers.py`), so a dashboard or alert written for vLLM reads a fastserve server
unchanged.

Counters and histograms are updated by the request handlers on the event loop (one thread, so
no locks); gauges of engine state are read from `engine.stats()` at scrape time. With data
parallelism the replicas' engine state is summed and reported as one engine (`engine="0"`)."""

from __future__ import annotations

import bisect
import math

PREFIX = "fastserve:"

_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_E2E_BUCKETS = (
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
)

# vLLM's buckets (vllm/v1/metrics/loggers.py), so histogram_quantile over them agrees.
VLLM_PREFIX = "vllm:"
VLLM_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
VLLM_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
VLLM_REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
VLLM_N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM's FinishReason strings (the `finished_reason` label values it exports).
VLLM_FINISH_REASONS = ("stop", "length", "abort", "error")


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(value)
        exponent += 1


def _fmt(v: float) -> str:
    f = float(v)
    if f == math.inf:
        return "+Inf"
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


def go_float(v: float) -> str:
    """A float as Prometheus' Go client (and prometheus_client, so vLLM) writes it: `le` is
    "5.0", "0.001", "+Inf", "1e+06"."""
    f = float(v)
    if f == math.inf:
        return "+Inf"
    s = repr(f)
    dot = s.find(".")
    if f > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


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

    def render(self, name: str, labels: dict[str, str], le=_fmt) -> list[str]:
        lines, cumulative = [], 0
        for bound, c in zip(self.buckets + (math.inf,), self.counts):
            cumulative += c
            lines.append(f"{name}_bucket{_labels({**labels, 'le': le(bound)})} {cumulative}")
        lines.append(f"{name}_sum{_labels(labels)} {_fmt(self.sum)}")
        lines.append(f"{name}_count{_labels(labels)} {self.count}")
        return lines


class _Both:
    """One observation into fastserve's histogram and vLLM's (different buckets)."""

    def __init__(self, own: Histogram, vllm: Histogram) -> None:
        self.own = own
        self.vllm = vllm

    def observe(self, value: float) -> None:
        self.own.observe(value)
        self.vllm.observe(value)

    @property
    def count(self) -> int:
        return self.own.count


FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int = 2048) -> None:
        self.labels = {"model_name": model_name}
        self.request_success = {r: 0 for r in FINISH_REASONS}
        self.vllm_request_success = {r: 0 for r in VLLM_FINISH_REASONS}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.http_requests: dict[tuple[str, int], int] = {}
        self.ttft = _Both(Histogram(_TTFT_BUCKETS), Histogram(VLLM_TTFT_BUCKETS))
        self.itl = _Both(Histogram(_ITL_BUCKETS), Histogram(VLLM_ITL_BUCKETS))
        self.e2e = _Both(Histogram(_E2E_BUCKETS), Histogram(VLLM_REQUEST_LATENCY_BUCKETS))
        self.request_tpot = Histogram(VLLM_ITL_BUCKETS)
        self.request_params_n = Histogram(VLLM_N_BUCKETS)
        self.set_max_model_len(max_model_len)

    def set_max_model_len(self, max_model_len: int | None) -> None:
        """Token-count histograms are bucketed up to the context length (vLLM's 1-2-5 rule);
        called once the engine is loaded, before any request is counted."""
        buckets = build_1_2_5_buckets(max(1, int(max_model_len or 2048)))
        self.request_prompt_tokens = Histogram(buckets)
        self.request_generation_tokens = Histogram(buckets)
        self.request_params_max_tokens = Histogram(buckets)

    def count_http(self, route: str, status: int) -> None:
        key = (route, status)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def finished(
        self,
        reason: str | None,
        e2e_seconds: float,
        *,
        prompt_tokens: int | None = None,
        generation_tokens: int | None = None,
        params=None,
        decode_seconds: float | None = None,
    ) -> None:
        """A request ended (reason "stop"/"length"/"abort", or "error" when the engine failed
        it). The keyword arguments feed vLLM's per-request histograms when known."""
        self.vllm_request_success[reason if reason in VLLM_FINISH_REASONS else "abort"] += 1
        reason = reason if reason in self.request_success else "abort"
        self.request_success[reason] += 1
        self.e2e.observe(e2e_seconds)
        if prompt_tokens is not None:
            self.request_prompt_tokens.observe(prompt_tokens)
        if generation_tokens is not None:
            self.request_generation_tokens.observe(generation_tokens)
            if decode_seconds is not None and generation_tokens > 1:
                self.request_tpot.observe(decode_seconds / (generation_tokens - 1))
        if params is not None:
            self.request_params_n.observe(params.n)
            if params.max_tokens is not None:
                self.request_params_max_tokens.observe(params.max_tokens)

    def render(self, stats: dict | None) -> str:
        return self._render_own(stats) + self._render_vllm(stats)

    def _render_vllm(self, stats: dict | None) -> str:
        out: list[str] = []
        lab = {**self.labels, "engine": "0"}

        def metric(name, kind, help_, samples):
            full = VLLM_PREFIX + name
            out.append(f"# HELP {full} {help_}")
            out.append(f"# TYPE {full} {kind}")
            for labels, value in samples:
                out.append(f"{full}{_labels({**lab, **labels})} {_fmt(value)}")

        def hist(name, help_, h: Histogram):
            full = VLLM_PREFIX + name
            out.append(f"# HELP {full} {help_}")
            out.append(f"# TYPE {full} histogram")
            out.extend(h.render(full, lab, le=go_float))

        s = stats or {}
        metric(
            "num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [({}, s.get("num_running", 0))],
        )
        metric(
            "num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [({}, s.get("num_waiting", 0))],
        )
        metric(
            "kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [({}, s.get("kv_cache_usage", 0.0))],
        )
        metric(
            "prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            [({}, s.get("prefix_cache_queried_tokens", 0))],
        )
        metric(
            "prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            [({}, s.get("prefix_cache_hit_tokens", 0))],
        )
        metric(
            "num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
            [({}, s.get("num_preemptions", 0))],
        )
        metric("prompt_tokens_total", "counter", "Number of prefill tokens processed.", [({}, self.prompt_tokens)])
        metric(
            "generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            [({}, self.generation_tokens)],
        )
        metric(
            "request_success_total",
            "counter",
            "Count of successfully processed requests.",
            [({"finished_reason": r}, c) for r, c in self.vllm_request_success.items()],
        )
        hist("request_prompt_tokens", "Number of prefill tokens processed.", self.request_prompt_tokens)
        hist("request_generation_tokens", "Number of generation tokens processed.", self.request_generation_tokens)
        hist("request_params_n", "Histogram of the n request parameter.", self.request_params_n)
        hist(
            "request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            self.request_params_max_tokens,
        )
        hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft.vllm)
        hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl.vllm)
        hist(
            "request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            self.request_tpot,
        )
        hist("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e.vllm)
        return "\n".join(out) + "\n"

    def _render_own(self, stats: dict | None) -> str:
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
        metric(
            "num_requests_running", "gauge", "Requests in the engine's running set.", [({}, s.get("num_running", 0))]
        )
        metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", [({}, s.get("num_waiting", 0))])
        metric(
            "kv_cache_usage_perc",
            "gauge",
            "Fraction of KV-cache blocks in use (0 to 1).",
            [({}, s.get("kv_cache_usage", 0.0))],
        )
        metric("num_free_blocks", "gauge", "Free KV-cache blocks.", [({}, s.get("num_free_blocks", 0))])
        metric("num_total_blocks", "gauge", "KV-cache blocks in the pool.", [({}, s.get("num_total_blocks", 0))])
        metric(
            "num_preemptions_total",
            "counter",
            "Requests preempted for lack of KV blocks.",
            [({}, s.get("num_preemptions", 0))],
        )
        metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", [({}, queried)])
        metric("prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.", [({}, hits)])
        metric(
            "prefix_cache_hit_rate",
            "gauge",
            "Prefix-cache hits over queries since start (0 when nothing was queried).",
            [({}, hits / queried if queried else 0.0)],
        )
        metric(
            "request_success_total",
            "counter",
            "Finished requests by finish reason.",
            [({"finished_reason": r}, c) for r, c in self.request_success.items()],
        )
        metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [({}, self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated.", [({}, self.generation_tokens)])
        hist("time_to_first_token_seconds", "Time from request arrival to its first token.", self.ttft.own)
        hist("inter_token_latency_seconds", "Time between successive output tokens.", self.itl.own)
        hist("e2e_request_latency_seconds", "Time from request arrival to its last token.", self.e2e.own)
        metric(
            "http_requests_total",
            "counter",
            "HTTP requests by route and status.",
            [({"route": r, "status": str(st)}, c) for (r, st), c in sorted(self.http_requests.items())],
        )
        return "\n".join(out) + "\n"
