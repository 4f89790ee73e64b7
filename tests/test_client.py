"""fastserve.client against a real fastserve server (real engine, tiny random model), plus a
small aiohttp stub used only to drive the client's retry logic through exact failure
sequences (503, 429, timeouts) that a healthy server does not produce on demand."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web
from fastserve.client import APIError, AsyncClient
from fastserve.client.__main__ import main as client_cli
from server_harness import ServerThread, free_port, subprocess_env, tiny_qwen_checkpoint

KEY = "client-test-key"
pytestmark = pytest.mark.timeout(300)
FIXED = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt"))
    s = ServerThread(["--model", str(ckpt), "--device", "cpu", "--served-model-name", "tiny", "--api-key", KEY]).start()
    yield s
    s.stop()


def run(coro):
    return asyncio.run(coro)


def test_chat_complete_and_model_discovery(server):
    async def main():
        async with AsyncClient(server.base_url + "/v1", api_key=KEY) as c:
            assert await c.models() == ["tiny"]
            r = await c.chat([{"role": "user", "content": "Hi"}], max_tokens=5, **FIXED)
            assert c.model == "tiny"  # first of /v1/models
            raw = await c.chat_raw([{"role": "user", "content": "Hi"}], max_tokens=5, **FIXED)
            done = await c.complete("Once", max_tokens=4, **FIXED)
            return r, raw, done

    r, raw, done = run(main())
    assert r.ok and r.text == raw["choices"][0]["message"]["content"]
    assert r.finish_reason == "length" and r.usage["completion_tokens"] == 5
    assert done.ok and done.usage["completion_tokens"] == 4 and done.texts == [done.text]


def test_streams_equal_whole(server):
    async def main():
        async with AsyncClient(server.base_url, api_key=KEY) as c:
            msgs = [{"role": "user", "content": "Stream please"}]
            whole = await c.chat(msgs, max_tokens=10, **FIXED)
            parts = [d async for d in c.stream_chat(msgs, max_tokens=10, **FIXED)]
            cwhole = await c.complete("Stream", max_tokens=10, **FIXED)
            cparts = [d async for d in c.stream_complete("Stream", max_tokens=10, **FIXED)]
            return whole, parts, cwhole, cparts

    whole, parts, cwhole, cparts = run(main())
    assert "".join(parts) == whole.text and len(parts) > 1
    assert "".join(cparts) == cwhole.text


def test_map_order_and_captured_errors(server):
    prompts = [f"Item {i}:" for i in range(24)]
    requests = [p if i % 5 else {"prompt": p, "temperature": -1.0} for i, p in enumerate(prompts)]

    async def main():
        async with AsyncClient(server.base_url, api_key=KEY, max_concurrency=8) as c:
            done = await c.map_complete(requests, progress=True, max_tokens=3, echo=True, ignore_eos=True)
            chats = await c.map_chat(
                [[{"role": "user", "content": p}] for p in prompts[:6]] + [{"messages": [], "max_tokens": 2}],
                progress=False,
                max_tokens=2,
            )
            return done, chats

    done, chats = run(main())
    assert len(done) == 24
    for i, (p, r) in enumerate(zip(prompts, done)):
        if i % 5 == 0:
            assert not r.ok and "HTTP 400" in r.error and "temperature" in r.error
        else:
            assert r.ok and r.text.startswith(p), (i, r)  # in input order
    assert [r.ok for r in chats] == [True] * 6 + [False]
    assert "messages" in chats[-1].error


def test_auth_error_not_retried(server):
    async def main():
        async with AsyncClient(server.base_url, api_key="wrong", max_retries=5, backoff_base=10) as c:
            t0 = time.monotonic()
            with pytest.raises(APIError) as e:
                await c.complete("x", model="tiny", max_tokens=1)
            return e.value, time.monotonic() - t0

    err, elapsed = run(main())
    assert err.status == 401 and elapsed < 5


class Stub:
    """An HTTP endpoint that answers from a script of (status, delay) steps."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    async def handle(self, request):
        self.calls += 1
        status, delay, headers = self.script[min(self.calls, len(self.script)) - 1]
        if delay:
            await asyncio.sleep(delay)
        if status == 200 and request.headers.get("X-Stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for text in ("a", "b"):
                await resp.write(b'data: {"choices": [{"index": 0, "text": "%s"}]}\n\n' % text.encode())
            if self.calls == 1 and len(self.script) > 1 and self.script[1][0] == "cut":
                request.transport.close()  # dies mid-stream: must not be retried
                return resp
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if status == 200:
            return web.json_response(
                {
                    "id": "x",
                    "object": "text_completion",
                    "model": "m",
                    "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                    "usage": {"completion_tokens": 1},
                }
            )
        return web.json_response(
            {"error": {"message": f"scripted {status}", "type": "t", "param": None, "code": None}},
            status=status,
            headers=headers,
        )


async def with_stub(script, fn):
    stub = Stub(script)
    app = web.Application()
    app.router.add_post("/v1/completions", stub.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return stub, await fn(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_retry_on_503_then_success():
    async def fn(url):
        async with AsyncClient(url, model="m", max_retries=3, backoff_base=0.01) as c:
            return await c.complete("x")

    stub, r = run(with_stub([(503, 0, None), (503, 0, None), (200, 0, None)], fn))
    assert stub.calls == 3 and r.text == "ok"


def test_stream_retried_only_before_first_event():
    async def ok(url):
        async with AsyncClient(url, model="m", max_retries=3, backoff_base=0.01, headers={"X-Stream": "1"}) as c:
            return [d async for d in c.stream_complete("x")]

    stub, parts = run(with_stub([(503, 0, None), (200, 0, None)], ok))
    assert stub.calls == 2 and parts == ["a", "b"]

    async def cut(url):
        async with AsyncClient(url, model="m", max_retries=3, backoff_base=0.01, headers={"X-Stream": "1"}) as c:
            parts = []
            with pytest.raises(aiohttp.ClientError):
                async for d in c.stream_complete("x"):
                    parts.append(d)
            return parts

    stub, parts = run(with_stub([(200, 0, None), ("cut", 0, None)], cut))
    assert stub.calls == 1 and parts == ["a", "b"]


def test_retry_honours_429_retry_after_and_gives_up():
    async def fn(url):
        async with AsyncClient(url, model="m", max_retries=2, backoff_base=0.01) as c:
            t0 = time.monotonic()
            with pytest.raises(APIError) as e:
                await c.complete("x")
            return e.value, time.monotonic() - t0

    stub, (err, elapsed) = run(with_stub([(429, 0, {"Retry-After": "0.3"})], fn))
    assert stub.calls == 3 and err.status == 429
    assert elapsed >= 0.6  # two waits of Retry-After


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_no_retry_on_4xx(status):
    async def fn(url):
        async with AsyncClient(url, model="m", max_retries=3, backoff_base=0.01) as c:
            with pytest.raises(APIError) as e:
                await c.complete("x")
            return e.value

    stub, err = run(with_stub([(status, 0, None), (200, 0, None)], fn))
    assert stub.calls == 1 and err.status == status and "scripted" in err.message


def test_per_request_timeout_retried():
    async def fn(url):
        async with AsyncClient(url, model="m", max_retries=2, backoff_base=0.01) as c:
            r = await c.complete("x", timeout=0.3)
            with pytest.raises(asyncio.TimeoutError):
                await c.complete("x", timeout=0.3)
            return r

    script = [(200, 1.0, None), (200, 0, None)] + [(200, 1.0, None)] * 3
    stub, r = run(with_stub(script, fn))
    assert r.text == "ok"
    assert stub.calls == 2 + 3  # first call: 1 timeout + success; second: 3 timeouts


def test_connection_error_retried_then_raised():
    port = free_port()  # nothing listens there

    async def main():
        async with AsyncClient(f"http://127.0.0.1:{port}", model="m", max_retries=2, backoff_base=0.05) as c:
            results = await c.map_complete(["a", "b"], progress=False)
            with pytest.raises(aiohttp.ClientConnectionError):
                await c.complete("x")
            return results

    results = run(main())
    assert all(not r.ok and "Connect" in r.error for r in results)


def test_batch_cli_resumable(server, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": f"q{i}", "prompt": f"Line {i}", "max_tokens": 2} for i in range(5)]
    lines.append({"id": "chat", "messages": [{"role": "user", "content": "hey"}]})
    lines.append({"id": "bad", "prompt": "x", "top_p": 7})
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    argv = [
        "--base-url",
        server.base_url,
        "--api-key",
        KEY,
        "--input",
        str(inp),
        "--output",
        str(out),
        "--concurrency",
        "4",
        "--max-tokens",
        "3",
        "--no-progress",
    ]
    assert client_cli(argv) == 1  # one request failed
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(x["id"] for x in lines)
    by_id = {r["id"]: r for r in recs}
    assert by_id["bad"]["error"] and "top_p" in by_id["bad"]["error"]
    assert by_id["q0"]["usage"]["completion_tokens"] == 2  # per-line params win
    assert by_id["chat"]["usage"]["completion_tokens"] <= 3
    # an interrupted run leaves a torn line; a re-run skips what succeeded, retries the rest
    with out.open("a") as f:
        f.write('{"id": "q9", "te')
    assert client_cli(argv) == 1
    recs2 = [json.loads(x) for x in out.read_text().splitlines()[len(recs) + 1 :]]
    assert [r["id"] for r in recs2] == ["bad"]
    # with the bad line fixed, the job completes
    lines[-1]["top_p"] = 0.5
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert client_cli(argv) == 0
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["id"] == "bad" and last["error"] is None


def test_import_is_light():
    code = "import sys, fastserve.client; assert 'torch' not in sys.modules and 'fastserve._core' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env())


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_concurrency"):
        AsyncClient(max_concurrency=0)
    with pytest.raises(ValueError, match="timeout"):
        AsyncClient(timeout=0)
