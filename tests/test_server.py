"""The OpenAI-compatible server, end to end: a real engine on a tiny random Llama with the
real Qwen tokenizer, served on 127.0.0.1, queried with the official `openai` package and
with raw aiohttp for statuses and SSE framing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import openai
import pytest
from server_harness import ServerThread, free_port, subprocess_env, tiny_qwen_checkpoint

API_KEY = "test-key-" + os.urandom(4).hex()
MODEL = "tiny"
MAX_BODY_MB = 1

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt"))


# Seconds the engine sleeps per step (a test hook through EngineArgs.step_hook): lets a test
# make generation slow enough that "freed at once" and "ran to the end" cannot be confused.
STEP_DELAY = {"s": 0.0}


def _slow_step(batch):
    if STEP_DELAY["s"]:
        time.sleep(STEP_DELAY["s"])


@pytest.fixture(scope="module")
def server(checkpoint):
    s = ServerThread(
        [
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--served-model-name",
            MODEL,
            "other-name",
            "--api-key",
            API_KEY,
            "--max-request-body-mb",
            str(MAX_BODY_MB),
            "--seed",
            "7",
        ],
        step_hook=_slow_step,
    ).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)


def auth():
    return {"Authorization": f"Bearer {API_KEY}"}


def run(coro):
    return asyncio.run(coro)


async def post(url, body, headers=None, raw: bytes | None = None):
    async with aiohttp.ClientSession() as s:
        async with s.post(
            url,
            data=raw if raw is not None else json.dumps(body),
            headers={"Content-Type": "application/json", **(auth() if headers is None else headers)},
        ) as r:
            return r.status, await r.read(), r.headers


async def get(url, headers=None):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers if headers is not None else auth()) as r:
            return r.status, await r.read(), r.headers


def tokenize(server, **body) -> list[int]:
    status, data, _ = run(post(server.base_url + "/tokenize", body))
    assert status == 200, data
    return json.loads(data)["tokens"]


async def metrics_async(server) -> dict[str, float]:
    status, data, _ = await get(server.base_url + "/metrics", headers={})
    assert status == 200
    out = {}
    for line in data.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")] = float(value)
    return out


def metrics(server) -> dict[str, float]:
    return run(metrics_async(server))


GREEDY = {"temperature": 0.0}
FIXED = {"ignore_eos": True}  # vLLM extra: holds the output at max_tokens


# -- OpenAI package: the happy paths ------------------------------------------------------


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "other-name"]
    assert models.data[0].max_model_len == 512
    assert models.data[0].owned_by == "fastserve"


def test_completion(client):
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=7, extra_body=FIXED, **GREEDY
    )
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    # the second served name is accepted too
    r2 = client.completions.create(
        model="other-name", prompt="The capital of France is", max_tokens=7, extra_body=FIXED, **GREEDY
    )
    assert r2.choices[0].text == r.choices[0].text and r2.model == "other-name"


def test_completion_prompt_forms(client, server):
    texts = ["Hello there, my friend", "Numbers: 1 2 3 4"]
    ids = [tokenize(server, prompt=t) for t in texts]
    kw = dict(model=MODEL, max_tokens=5, extra_body=FIXED, **GREEDY)
    by_text = client.completions.create(prompt=texts, **kw)
    assert [c.index for c in by_text.choices] == [0, 1]
    singles = [client.completions.create(prompt=t, **kw).choices[0].text for t in texts]
    assert [c.text for c in by_text.choices] == singles
    assert client.completions.create(prompt=ids[0], **kw).choices[0].text == singles[0]
    by_ids = client.completions.create(prompt=ids, **kw)
    assert [c.text for c in by_ids.choices] == singles
    assert by_ids.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    assert by_ids.usage.completion_tokens == 10


def test_completion_echo(client, server):
    r = client.completions.create(
        model=MODEL, prompt="Echo me please", max_tokens=3, echo=True, extra_body=FIXED, **GREEDY
    )
    plain = client.completions.create(model=MODEL, prompt="Echo me please", max_tokens=3, extra_body=FIXED, **GREEDY)
    assert r.choices[0].text == "Echo me please" + plain.choices[0].text


def test_chat(client, server):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, extra_body=FIXED, **GREEDY)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len(tokenize(server, messages=messages))
    # max_completion_tokens is the newer name of the same limit
    r2 = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=6, extra_body=FIXED, **GREEDY
    )
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_chat_template_kwargs(client, server):
    messages = [{"role": "user", "content": "Think or not?"}]
    on = tokenize(server, messages=messages)
    off = tokenize(server, messages=messages, chat_template_kwargs={"enable_thinking": False})
    # The Qwen template writes an empty think block when thinking is off.
    assert len(off) > len(on) and off[: len(on)] == on
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert r.usage.prompt_tokens == len(off)


def test_stream_equals_non_stream(client):
    kw = dict(model=MODEL, max_tokens=12, extra_body=FIXED, **GREEDY)
    full = client.completions.create(prompt="Once upon a time", **kw)
    parts, finish = [], []
    for chunk in client.completions.create(prompt="Once upon a time", stream=True, **kw):
        parts.append(chunk.choices[0].text)
        finish.append(chunk.choices[0].finish_reason)
    assert "".join(parts) == full.choices[0].text
    assert [f for f in finish if f] == ["length"]

    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(messages=messages, **kw)
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(messages=messages, stream=True, **kw)
        if c.choices
    ]
    assert "".join(parts) == full.choices[0].message.content


def test_n_choices(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        n=3,
        max_tokens=8,
        temperature=1.0,
        seed=11,
        extra_body=FIXED,
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # independent samples of a random model differ

    got: dict[int, list[str]] = {0: [], 1: []}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for chunk in client.completions.create(
        model=MODEL, prompt="abc", n=2, max_tokens=5, temperature=1.0, seed=3, stream=True, extra_body=FIXED
    ):
        c = chunk.choices[0]
        got[c.index].append(c.text)
        if c.finish_reason:
            finishes[c.index].append(c.finish_reason)
    full = client.completions.create(
        model=MODEL, prompt="abc", n=2, max_tokens=5, temperature=1.0, seed=3, extra_body=FIXED
    )
    assert {c.index: c.text for c in full.choices} == {i: "".join(p) for i, p in got.items()}
    assert finishes == {0: ["length"], 1: ["length"]}


def test_seed_reproducible(client):
    kw = dict(model=MODEL, prompt="Random words:", max_tokens=16, temperature=1.0, extra_body=FIXED)
    a = client.completions.create(seed=42, **kw).choices[0].text
    b = client.completions.create(seed=42, **kw).choices[0].text
    c = client.completions.create(seed=43, **kw).choices[0].text
    assert a == b
    assert a != c


def test_logprobs_completions(client):
    r = client.completions.create(
        model=MODEL, prompt="Logprobs please", max_tokens=6, logprobs=3, extra_body=FIXED, **GREEDY
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text or "\ufffd" in "".join(lp.tokens)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 3 <= len(top) <= 4
        # greedy: the sampled token is the most likely one
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # sampled (not greedy): the chosen token is always among top_logprobs (OpenAI's k + 1)
    r = client.completions.create(
        model=MODEL, prompt="Logprobs please", max_tokens=8, logprobs=1, temperature=1.0, seed=5, extra_body=FIXED
    )
    lp = r.choices[0].logprobs
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[tok] == chosen and 1 <= len(top) <= 2


def test_logprobs_chat(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        extra_body=FIXED,
        **GREEDY,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
        assert item.bytes == list(item.token.encode())
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        logprobs=True,
        extra_body=FIXED,
        **GREEDY,
    )
    assert [len(c.top_logprobs) for c in r.choices[0].logprobs.content] == [0, 0, 0]
    streamed = [
        c
        for chunk in client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=5,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            extra_body=FIXED,
            **GREEDY,
        )
        if chunk.choices and chunk.choices[0].logprobs
        for c in chunk.choices[0].logprobs.content
    ]
    assert [c.token for c in streamed] == [c.token for c in content]


def test_prompt_logprobs_and_best_of(client, server):
    prompt = "Score this prompt please"
    n_prompt = len(tokenize(server, prompt=prompt))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 2}, **GREEDY)
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == n_prompt and plp[0] is None
    for step in plp[1:]:
        assert 1 <= len(step) <= 3
        assert all(v["logprob"] <= 0 and v["rank"] >= 1 for v in step.values())
    # best_of: 3 sequences run, the most likely one is returned
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, n=1, best_of=3, temperature=1.0, seed=1, extra_body=FIXED
    )
    assert len(r.choices) == 1 and r.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, best_of=3, stream=True)
    assert e.value.body["param"] == "best_of"


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="The stop test:", max_tokens=24, extra_body=FIXED, **GREEDY)
    text = client.completions.create(**kw).choices[0].text
    # a stop string from the middle of the greedy output (any 2 characters of it)
    start = next(i for i in range(4, len(text) - 2) if text[i : i + 2].strip())
    stop = text[start : start + 2]
    cut = text[: text.index(stop)]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == cut
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    r = client.completions.create(stop=stop, **{**kw, "extra_body": {**FIXED, "include_stop_str_in_output": True}})
    assert r.choices[0].text == cut + stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **kw))
    assert streamed == cut


def test_stop_token_ids(client):
    kw = dict(model=MODEL, prompt="Token stop:", max_tokens=12, **GREEDY)
    r = client.completions.create(logprobs=0, extra_body={**FIXED, "return_tokens_as_token_ids": True}, **kw)
    ids = [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]
    assert len(ids) == 12
    tid = ids[3]
    stopped = client.completions.create(extra_body={**FIXED, "stop_token_ids": [tid]}, **kw)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == tid
    assert stopped.usage.completion_tokens == ids.index(tid) + 1


def test_tokenize_detokenize(server):
    ids = tokenize(server, prompt="Tokenize this, please: 你好 🙂")
    status, data, _ = run(post(server.base_url + "/detokenize", {"tokens": ids}))
    assert status == 200 and json.loads(data)["prompt"] == "Tokenize this, please: 你好 🙂"
    status, data, _ = run(post(server.base_url + "/tokenize", {"prompt": "ab", "return_token_strs": True}))
    body = json.loads(data)
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert body["max_model_len"] == 512


def test_health_version_openapi(server):
    assert run(get(server.base_url + "/health", headers={}))[0] == 200
    status, data, _ = run(get(server.base_url + "/version", headers={}))
    import fastserve

    assert status == 200 and json.loads(data)["version"] == fastserve.__version__
    status, data, _ = run(get(server.base_url + "/openapi.json", headers={}))
    spec = json.loads(data)
    assert status == 200 and spec["openapi"].startswith("3.")
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
        "/version",
    ):
        assert path in spec["paths"]
    schema = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert "messages" in schema["required"] and "top_logprobs" in schema["properties"]


def test_metrics(client, server):
    before = metrics(server)
    client.completions.create(model=MODEL, prompt="count me", max_tokens=4, extra_body=FIXED, **GREEDY)
    after = metrics(server)
    assert after["fastserve:generation_tokens_total"] - before["fastserve:generation_tokens_total"] == 4
    assert after["fastserve:prompt_tokens_total"] > before["fastserve:prompt_tokens_total"]
    key = 'fastserve:request_success_total{finished_reason="length"}'
    assert after[key] == before[key] + 1
    assert (
        after["fastserve:time_to_first_token_seconds_count"]
        == before["fastserve:time_to_first_token_seconds_count"] + 1
    )
    assert (
        after["fastserve:inter_token_latency_seconds_count"]
        >= before["fastserve:inter_token_latency_seconds_count"] + 3
    )
    assert (
        after['fastserve:e2e_request_latency_seconds_bucket{le="+Inf"}']
        == after["fastserve:e2e_request_latency_seconds_count"]
    )
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_hit_rate",
        "prefix_cache_queries_total",
        "num_total_blocks",
    ):
        assert "fastserve:" + name in after
    assert after["fastserve:num_total_blocks"] > 0


def test_prefix_cache_hit_rate(client, server):
    prompt = "A shared prefix that spans several KV blocks. " * 8
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, **GREEDY)
    m = metrics(server)
    assert m["fastserve:prefix_cache_hits_total"] > 0
    assert 0 < m["fastserve:prefix_cache_hit_rate"] <= 1


def test_reasoning_parser(checkpoint):
    """--reasoning-parser deepseek_r1: output before </think> is reasoning_content, in both
    the whole answer and the stream's deltas (bad_words keeps the random model from ever
    closing the think block, so the split is known)."""
    s = ServerThread(["--model", str(checkpoint), "--device", "cpu", "--reasoning-parser", "deepseek_r1"]).start()
    try:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0)
        kw = dict(
            model=s.state.served_model_names[0],
            max_tokens=10,
            messages=[{"role": "user", "content": "Think about it"}],
            extra_body={**FIXED, "bad_words": ["</think>"]},
            **GREEDY,
        )
        whole = c.chat.completions.create(**kw).choices[0].message
        assert whole.content is None and whole.model_extra["reasoning_content"]
        deltas = [chunk.choices[0].delta for chunk in c.chat.completions.create(stream=True, **kw) if chunk.choices]
        assert (
            "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
            == whole.model_extra["reasoning_content"]
        )
        assert not any(d.content for d in deltas)
    finally:
        s.stop()


def test_demo_model(tmp_path, monkeypatch):
    """Without --model the server runs the built-in demo checkpoint (random weights, the
    shipped Qwen tokenizer), built once into the cache directory."""
    from fastserve.demo import DEMO_MODEL_NAME, demo_checkpoint

    monkeypatch.setenv("FASTSERVE_CACHE", str(tmp_path))
    path = demo_checkpoint()
    assert path.is_relative_to(tmp_path) and demo_checkpoint() == path
    s = ServerThread(["--model", str(path), "--device", "cpu", "--served-model-name", DEMO_MODEL_NAME]).start()
    try:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(
            model=DEMO_MODEL_NAME, max_tokens=4, extra_body=FIXED, messages=[{"role": "user", "content": "hello"}]
        )
        assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens > 3
    finally:
        s.stop()


# -- errors ---------------------------------------------------------------------------------


def error_of(status_data):
    status, data, _ = status_data
    body = json.loads(data)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return status, body["error"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_400_malformed_json(server, path):
    status, err = error_of(run(post(server.base_url + path, None, raw=b'{"model": "tiny", ')))
    assert status == 400 and "JSON" in err["message"]
    status, err = error_of(run(post(server.base_url + path, None, raw=b"[1, 2]")))
    assert status == 400


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [[1, 2], [999999999]]}, "prompt[1]"),
        ({"prompt": "x", "max_tokens": 600}, "max_tokens"),
        ({"prompt": "word " * 600, "max_tokens": 1}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_400_completions_field(server, body, param):
    status, err = error_of(run(post(server.base_url + "/v1/completions", {"model": MODEL, **body})))
    assert status == 400, err
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10_000}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "top_k": -5}, "top_k"),
        (
            {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ raise_exception('nope') }}"},
            "chat_template",
        ),
    ],
)
def test_400_chat_field(server, body, param):
    status, err = error_of(run(post(server.base_url + "/v1/chat/completions", {"model": MODEL, **body})))
    assert status == 400, err
    assert err["param"] == param, err


def test_400_context_length_message(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=512)
    assert "maximum context length is 512" in str(e.value)


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
    ],
)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_401(server, method, path, headers):
    fn = (
        get(server.base_url + path, headers=headers)
        if method == "GET"
        else post(server.base_url + path, {"model": MODEL, "prompt": "x"}, headers=headers)
    )
    status, err = error_of(run(fn))
    assert status == 401 and err["code"] == "invalid_api_key"


def test_401_openai_client(server):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_404(server, client):
    status, err = error_of(run(post(server.base_url + "/v1/completions", {"model": "no-such-model", "prompt": "x"})))
    assert status == 404 and err["param"] == "model" and err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    status, err = error_of(run(get(server.base_url + "/v1/nothing-here")))
    assert status == 404
    status, err = error_of(run(get(server.base_url + "/v1/completions")))
    assert status == 405


def test_413(server):
    big = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY_MB * 1024 * 1024 + 10)})
    status, err = error_of(run(post(server.base_url + "/v1/completions", None, raw=big.encode())))
    assert status == 413 and err["code"] == "request_too_large"


def test_503_until_loaded(checkpoint):
    """The HTTP server answers before the engine exists: /health and the API say 503 with an
    error body until the load finishes (here it is held back by the load never starting)."""
    from fastserve.server.app import build_app
    from fastserve.server.state import ServerState

    async def main():
        state = ServerState(
            served_model_names=[MODEL],
            model_path=str(checkpoint),
            api_key=None,
            chat_template=None,
            reasoning_parser=None,
        )
        runner = aiohttp.web.AppRunner(build_app(state, 1 << 20))
        await runner.setup()
        port = free_port()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            url = f"http://127.0.0.1:{port}"
            h = await get(url + "/health", headers={})
            c = await post(url + "/v1/completions", {"prompt": "x"}, headers={})
            m = await get(url + "/metrics", headers={})
            return h, c, m
        finally:
            await runner.cleanup()

    health, completion, metrics_ = run(main())
    for resp in (health, completion):
        status, err = error_of(resp)
        assert status == 503 and err["code"] == "model_loading"
        assert resp[2]["Retry-After"]
    assert metrics_[0] == 200


@pytest.mark.parametrize("stream", [False, True])
def test_engine_fault_never_a_traceback(checkpoint, stream):
    """A fault inside the engine's step loop (injected through EngineArgs.step_hook) reaches
    the client as an error body (a 503 engine_dead, as every EngineDeadError is: the server is
    going away, a retry belongs elsewhere; or an error event when the stream's 200 is already
    out), never a traceback; /health turns 503."""
    armed = {"on": False}

    def hook(batch):
        if armed["on"]:
            raise RuntimeError("injected fault")

    s = ServerThread(["--model", str(checkpoint), "--device", "cpu"], step_hook=hook).start()
    try:
        if not stream:
            armed["on"] = True
            status, err = error_of(
                run(post(s.base_url + "/v1/completions", {"prompt": "x", "max_tokens": 3}, headers={}))
            )
            assert status == 503 and err["code"] == "engine_dead"
        else:

            async def main():
                async with aiohttp.ClientSession() as session:
                    async with session.post(
                        s.base_url + "/v1/completions",
                        json={"prompt": "x", "max_tokens": 300, "ignore_eos": True, "stream": True},
                    ) as r:
                        events = []
                        async for line in r.content:
                            if line.startswith(b"data: "):
                                events.append(line[6:].strip())
                                armed["on"] = len(events) >= 2
                        return r.status, events

            status, events = run(main())
            assert status == 200 and events[-1] == b"[DONE]"
            err = json.loads(events[-2])["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "service_unavailable_error" and err["code"] == "engine_dead"
            assert all("choices" in json.loads(e) for e in events[:-2])
        assert "injected fault" not in err["message"]  # details stay in the server log
        status, err = error_of(run(get(s.base_url + "/health", headers={})))
        assert status == 503 and err["code"] == "engine_dead"
    finally:
        s.stop()


# -- SSE framing, disconnects, concurrency ---------------------------------------------------


def test_sse_framing(server):
    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.post(
                server.base_url + "/v1/chat/completions",
                headers=auth(),
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5,
                    "ignore_eos": True,
                    "stream": True,
                    "n": 2,
                    "temperature": 1.0,
                    "stream_options": {"include_usage": True},
                },
            ) as r:
                return r.status, r.headers["Content-Type"], await r.read()

    status, ctype, raw = run(main())
    assert status == 200 and ctype.startswith("text/event-stream")
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first = {c["choices"][0]["index"]: c for c in chunks[:2]}
    assert set(first) == {0, 1}
    for c in first.values():
        assert c["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    body, last = chunks[:-1], chunks[-1]
    assert all(c["usage"] is None for c in body)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    finals = [c["choices"][0] for c in body if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1]
    assert all(f["finish_reason"] == "length" and f["delta"] == {} for f in finals)


def test_continuous_usage_stats(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "count"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body=FIXED,
            **GREEDY,
        )
    )
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6
    assert len({c.usage.prompt_tokens for c in chunks}) == 1


def _wait_idle(server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(server)
        if (
            m["fastserve:num_requests_running"] == 0
            and m["fastserve:num_requests_waiting"] == 0
            and m["fastserve:num_free_blocks"] == m["fastserve:num_total_blocks"]
        ):
            return m
        time.sleep(0.05)
    raise AssertionError(f"engine not idle after {timeout}s: {metrics(server)}")


def test_disconnect_frees_blocks(server):
    _wait_idle(server)
    before = metrics(server)['fastserve:request_success_total{finished_reason="abort"}']

    async def stream_then_leave():
        async with aiohttp.ClientSession() as s:
            async with s.post(
                server.base_url + "/v1/completions",
                headers=auth(),
                json={"model": MODEL, "prompt": "long " * 50, "max_tokens": 400, "ignore_eos": True, "stream": True},
            ) as r:
                n = 0
                async for line in r.content:
                    n += line.startswith(b"data: ")
                    if n == 3:
                        break
            # leaving the block closes the connection mid-stream

    async def post_then_leave():
        async with aiohttp.ClientSession() as s:
            key = "fastserve:time_to_first_token_seconds_count"
            ttft_before = (await metrics_async(server))[key]
            task = asyncio.ensure_future(
                s.post(
                    server.base_url + "/v1/completions",
                    headers=auth(),
                    json={"model": MODEL, "prompt": "long " * 50, "max_tokens": 400, "ignore_eos": True},
                )
            )
            # leave once the engine is generating for it
            while (await metrics_async(server))[key] == ttft_before:
                assert not task.done(), "the request finished before the test could leave"
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    # 400 tokens at >= 20 ms a step take >= 8 s; an abort frees the blocks well before.
    STEP_DELAY["s"] = 0.02
    try:
        run(stream_then_leave())
        m = _wait_idle(server, timeout=3)
        assert m['fastserve:request_success_total{finished_reason="abort"}'] == before + 1
        run(post_then_leave())
        m = _wait_idle(server, timeout=3)
        assert m['fastserve:request_success_total{finished_reason="abort"}'] == before + 2
    finally:
        STEP_DELAY["s"] = 0.0


def test_200_concurrent(server):
    async def one(s, i):
        prompt = f"Request number {i} says"
        async with s.post(
            server.base_url + "/v1/completions",
            headers=auth(),
            json={
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": 4,
                "ignore_eos": True,
                "echo": True,
                "temperature": 0,
            },
        ) as r:
            body = await r.json()
        async with s.post(server.base_url + "/tokenize", headers=auth(), json={"prompt": prompt}) as r:
            count = (await r.json())["count"]
        return prompt, count, body

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            return await asyncio.gather(*(one(s, i) for i in range(200)))

    results = run(main())
    for prompt, count, body in results:
        assert "error" not in body, body
        # each answer belongs to its own request: it echoes that prompt, counts its tokens
        assert body["choices"][0]["text"].startswith(prompt)
        assert body["usage"] == {"prompt_tokens": count, "completion_tokens": 4, "total_tokens": count + 4}
    assert len({b["id"] for _, _, b in results}) == 200
    _wait_idle(server)


# -- process lifecycle ----------------------------------------------------------------------


def test_sigterm_drains(checkpoint, tmp_path):
    """`python -m fastserve` as a process: /health is 503 until loaded, SIGTERM lets the
    running stream finish, new connections are refused, exit code 0."""
    port = free_port()
    env = subprocess_env()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastserve",
            "--model",
            str(checkpoint),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--shutdown-timeout",
            "60",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        seen = []

        async def wait_ready():
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                try:
                    status, data, _ = await get(url + "/health", headers={})
                    seen.append((status, data))
                    if status == 200:
                        return
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                await asyncio.sleep(0.05)
            raise AssertionError("server did not become ready")

        run(wait_ready())
        # the listener came up before the engine: it answered 503 while loading
        assert seen[0][0] == 503
        for status, data in seen[:-1]:
            assert status == 503 and json.loads(data)["error"]["code"] == "model_loading"

        async def stream_through_sigterm():
            after_refusal = 0
            refused = False
            async with aiohttp.ClientSession() as s:
                async with s.post(
                    url + "/v1/completions",
                    json={
                        "prompt": "drain",
                        "max_tokens": 400,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    },
                ) as r:
                    events = []
                    async for line in r.content:
                        if not line.startswith(b"data: "):
                            continue
                        events.append(line[6:].strip())
                        after_refusal += refused
                        if len(events) == 2:
                            proc.send_signal(signal.SIGTERM)
                            await asyncio.sleep(0.5)
                            # no longer listening, while this stream goes on
                            with pytest.raises(aiohttp.ClientConnectionError):
                                async with aiohttp.ClientSession() as s2:
                                    await s2.get(url + "/health")
                            refused = True
                    return events, after_refusal

        events, after_refusal = run(stream_through_sigterm())
        assert events[-1] == b"[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 400
        finals = [json.loads(e)["choices"] for e in events[:-2]]
        assert finals[-1][0]["finish_reason"] == "length"
        assert after_refusal > 10
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
