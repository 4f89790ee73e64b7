"""/metrics under vLLM's names, types, labels and buckets, read the way Prometheus reads it:
the whole exposition goes through prometheus_client's text parser, and the vllm: families are
checked against vLLM's definitions (vllm/v1/metrics/loggers.py) and against the traffic sent."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from fastserve.server.metrics import (
    VLLM_ITL_BUCKETS,
    VLLM_REQUEST_LATENCY_BUCKETS,
    VLLM_TTFT_BUCKETS,
    build_1_2_5_buckets,
)
from prometheus_client import parser as prometheus_parser  # noqa: E402 - the reader Prometheus uses
from server_harness import ServerThread
from tiny_models import SHARED_MODELS, make_tiny_checkpoint

TOKENIZER = SHARED_MODELS / "llama3-tokenizer"
MODEL = "tiny-metrics"
MAX_MODEL_LEN = 128

pytestmark = pytest.mark.timeout(300)

# name -> type, as vLLM registers them (prometheus_client strips a counter's _total).
VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_params_n": "histogram",
    "vllm:request_params_max_tokens": "histogram",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("metrics"), vocab_size=1000)
    s = ServerThread(
        [
            "--model",
            str(path),
            "--tokenizer",
            str(TOKENIZER),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--num-gpu-blocks-override",
            "64",
            "--served-model-name",
            MODEL,
        ]
    ).start()
    yield s
    s.stop()


async def _get(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200
            return await r.text()


async def _post(url, body):
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            return r.status, await r.read()


def scrape(server) -> dict:
    """family name -> parsed Metric (raises on anything Prometheus could not read)."""
    text = asyncio.run(_get(server.base_url + "/metrics"))
    return {f.name: f for f in prometheus_parser.text_string_to_metric_families(text)}


def value(families, name: str, sample: str, **labels) -> float:
    for s in families[name].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{sample}{labels} not in {name}")


def test_vllm_families_types_and_labels(server):
    families = scrape(server)
    for name, kind in VLLM_FAMILIES.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, (name, families[name].type)
        for s in families[name].samples:
            assert s.labels["model_name"] == MODEL and s.labels["engine"] == "0", (name, s.labels)
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error"}

    def bounds(name):
        return [float(s.labels["le"]) for s in families[name].samples if s.name == name + "_bucket"]

    inf = float("inf")
    assert bounds("vllm:time_to_first_token_seconds") == [*VLLM_TTFT_BUCKETS, inf]
    assert bounds("vllm:inter_token_latency_seconds") == [*VLLM_ITL_BUCKETS, inf]
    assert bounds("vllm:e2e_request_latency_seconds") == [*VLLM_REQUEST_LATENCY_BUCKETS, inf]
    assert bounds("vllm:request_prompt_tokens") == [*build_1_2_5_buckets(MAX_MODEL_LEN), inf]
    assert build_1_2_5_buckets(MAX_MODEL_LEN) == (1, 2, 5, 10, 20, 50, 100)
    # Spot-check against vLLM's literal lists.
    assert VLLM_TTFT_BUCKETS[-3:] == (160.0, 640.0, 2560.0) and VLLM_REQUEST_LATENCY_BUCKETS[-1] == 7680.0
    # fastserve's own names are still there.
    assert "fastserve:request_success" in families and "fastserve:num_total_blocks" in families


def test_vllm_counters_follow_traffic(server):
    before = scrape(server)
    prompt = [5, 6, 7, 8, 9]
    status, body = asyncio.run(
        _post(
            server.base_url + "/v1/completions",
            {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
    )
    assert status == 200, body
    status, _ = asyncio.run(
        _post(
            server.base_url + "/v1/completions",
            {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True},
        )
    )
    assert status == 200
    after = scrape(server)

    def delta(name, sample, **labels):
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == 7
    assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == 2 * len(prompt)
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 2
    assert delta("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == 3 + 2
    assert delta("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == 7
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == 10
    assert delta("vllm:request_params_max_tokens", "vllm:request_params_max_tokens_sum") == 7
    # A 5-token prompt lands in the le=5 bucket (cumulative), not in le=2.
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_bucket", le="5.0") == 2
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_bucket", le="2.0") == 0
    # vllm: and fastserve: count the same thing.
    assert value(after, "vllm:generation_tokens", "vllm:generation_tokens_total") == value(
        after, "fastserve:generation_tokens", "fastserve:generation_tokens_total"
    )
    assert value(after, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") == value(
        after, "fastserve:kv_cache_usage_perc", "fastserve:kv_cache_usage_perc"
    )
    assert 0.0 <= value(after, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") <= 1.0
    assert value(after, "vllm:num_requests_running", "vllm:num_requests_running") == 0


def test_prefix_cache_counters_are_vllms(server):
    prompt = list(range(10, 60))  # 50 tokens: three full 16-token blocks to reuse
    before = scrape(server)
    for _ in range(2):
        status, body = asyncio.run(
            _post(server.base_url + "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0})
        )
        assert status == 200, body
    after = scrape(server)
    hits = value(after, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") - value(
        before, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"
    )
    queries = value(after, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") - value(
        before, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total"
    )
    assert 48 <= hits <= queries


def test_bucket_bounds_are_written_as_prometheus_client_writes_them():
    from fastserve.server.metrics import go_float
    from prometheus_client.utils import floatToGoString

    for v in (*VLLM_TTFT_BUCKETS, *VLLM_REQUEST_LATENCY_BUCKETS, *build_1_2_5_buckets(10**7), float("inf")):
        assert go_float(v) == floatToGoString(v)
