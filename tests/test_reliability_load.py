"""The server under load, as a separate process (`python -m fastserve`, tiny checkpoint,
127.0.0.1) driven by this one:

- 5,000 requests from 500 concurrent clients: completions and chat, streaming or not, n up to
  4, greedy and seeded sampling, with a fifth of the streams dropped at a random point. Every
  answer equals the same request run alone; none is lost, duplicated or a 5xx; afterwards the
  engine is idle with every KV block back, and the process RSS is within 10% of what it was
  after warm-up.
- Far more concurrent long requests than the KV cache holds (--num-gpu-blocks-override):
  requests are preempted and resumed, and all finish with their alone output."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time

import aiohttp
import pytest
from server_harness import free_port, subprocess_env, tiny_qwen_checkpoint

# 5,000 requests from 500 clients, as the issue asks: about 8 minutes on a 2-core CI runner
# (the CPU engine serves ~10 requests/s there). FASTSERVE_LOAD_REQUESTS lowers it for a quick
# local run.
NUM_CLIENTS = int(os.environ.get("FASTSERVE_LOAD_CLIENTS", "500"))
NUM_REQUESTS = int(os.environ.get("FASTSERVE_LOAD_REQUESTS", "5000"))
DROP_FRACTION = 0.2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt"))


class ServerProcess:
    def __init__(self, checkpoint, log_path, *flags: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastserve",
                "--model",
                str(checkpoint),
                "--device",
                "cpu",
                "--port",
                str(self.port),
                "--disable-log-requests",
                "--log-level",
                "warning",
                # One torch thread: on a 2-core runner a second one only fights the server's event
                # loop and this process's clients for the cores.
                *flags,
            ],
            env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, session, timeout=120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                async with session.get(self.base + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            await asyncio.sleep(0.1)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def metrics(session, base) -> dict[str, float]:
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")] = float(value)
    return out


async def wait_idle(session, base, timeout=30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = await metrics(session, base)
        if (
            m["fastserve:num_requests_running"] == 0
            and m["fastserve:num_requests_waiting"] == 0
            and m["fastserve:num_free_blocks"] == m["fastserve:num_total_blocks"]
        ):
            return m
        assert time.monotonic() < deadline, f"engine not idle after {timeout} s: {m}"
        await asyncio.sleep(0.1)


def make_templates(rng: random.Random, count: int) -> list[dict]:
    """Distinct requests (endpoint + body without `stream`): lengths, n, greedy or seeded."""
    out = []
    for i in range(count):
        # Mostly greedy: on CPU, drawing the seeded noise over Qwen's 151,936-token vocabulary
        # costs far more than the tiny model, and this test is about the server, not the sampler.
        n = rng.choice([1] * 8 + [2, 4])
        body = {"model": "tiny", "max_tokens": rng.randint(4, 12), "n": n}
        if n == 1 and rng.random() < 0.85:  # (vLLM refuses n > 1 when greedy)
            body["temperature"] = 0.0
        else:
            body.update(temperature=0.9, seed=rng.randrange(1 << 30))
        if rng.random() < 0.7:
            body["ignore_eos"] = True
        if rng.random() < 0.2:
            body["stop"] = [" the", "\n\n"]
        if rng.random() < 0.65:
            path = "/v1/completions"
            length = rng.choice([3, 8, 20, 60])
            body["prompt"] = [rng.randrange(100, 100000) for _ in range(length)]
        else:
            path = "/v1/chat/completions"
            words = rng.choice([2, 10, 40])
            body["messages"] = [
                {
                    "role": "user",
                    "content": " ".join(
                        rng.choice(["alpha", "beta", "gamma", "delta", "tea", "cup", "42", "é"]) for _ in range(words)
                    ),
                }
            ]
        out.append((path, body))
    return out


def texts_of(path: str, body: dict) -> dict[int, str]:
    key = "text" if path == "/v1/completions" else "message"
    return {c["index"]: (c[key] if key == "text" else c[key]["content"]) for c in body["choices"]}


async def call(session, base, path, body, stream: bool, drop_after: int | None):
    """(status, id, {index: text}, finish reasons) or ("dropped", ...) when the client left."""
    async with session.post(base + path, json={**body, "stream": stream}) as r:
        if not stream:
            data = await r.json(content_type=None)
            if r.status != 200:
                return r.status, data, None, None
            return 200, data["id"], texts_of(path, data), {c["index"]: c["finish_reason"] for c in data["choices"]}
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        ids = set()
        events = 0
        done = False
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            events += 1
            ids.add(chunk["id"])
            for c in chunk["choices"]:
                piece = c["text"] if path == "/v1/completions" else c["delta"].get("content", "")
                texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
                if c.get("finish_reason"):
                    assert c["index"] not in reasons, "a choice finished twice"
                    reasons[c["index"]] = c["finish_reason"]
            if drop_after is not None and events >= drop_after:
                r.close()  # the client goes away mid-stream
                return "dropped", None, None, None
        assert done and len(ids) == 1, "stream without [DONE] or with mixed ids"
        return r.status, ids.pop(), texts, reasons


@pytest.mark.timeout(int(os.environ.get("FASTSERVE_LOAD_TIMEOUT", "1500")))
def test_5000_requests_500_clients(checkpoint, tmp_path):
    rng = random.Random(1234)
    templates = make_templates(rng, 60)
    server = ServerProcess(checkpoint, tmp_path / "server.log", "--served-model-name", "tiny", "--seed", "11")

    async def main():
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            await server.wait_ready(s)
            # each distinct request alone, one at a time: the references
            refs = []
            t0 = time.monotonic()
            for path, body in templates:
                status, rid, texts, _ = await call(s, server.base, path, body, False, None)
                assert status == 200, rid
                assert len(texts) == body["n"]
                refs.append(texts)
            print(f"references: {time.monotonic() - t0:.1f} s", flush=True)
            plan = []  # (template, stream, drop_after)
            for _ in range(NUM_REQUESTS):
                t = rng.randrange(len(templates))
                stream = rng.random() < 0.5
                drop = rng.randint(1, 6) if stream and rng.random() < DROP_FRACTION else None
                plan.append((t, stream, drop))

            async def clients(items):
                queue = list(enumerate(items))
                results: dict[int, tuple] = {}

                async def client():
                    while queue:
                        k, (t, stream, drop) = queue.pop()
                        path, body = templates[t]
                        results[k] = await call(s, server.base, path, body, stream, drop)

                await asyncio.gather(*(client() for _ in range(NUM_CLIENTS)))
                return results

            # warm-up: bursts at full concurrency, so allocator pools reach their working size
            t0 = time.monotonic()
            await clients(plan[:NUM_CLIENTS])
            await clients(plan[-NUM_CLIENTS:])
            print(f"warm-up burst of {NUM_CLIENTS}: {time.monotonic() - t0:.1f} s", flush=True)
            await wait_idle(s, server.base)
            rss_warm = server.rss_bytes()
            before = await metrics(s, server.base)
            t0 = time.monotonic()
            results = await clients(plan)
            elapsed = time.monotonic() - t0
            after = await wait_idle(s, server.base)
            rss_after = server.rss_bytes()
            return refs, plan, results, before, after, rss_warm, rss_after, elapsed

    try:
        refs, plan, results, before, after, rss_warm, rss_after, elapsed = asyncio.run(main())
    finally:
        server.stop()
    print(f"{NUM_REQUESTS} requests in {elapsed:.1f} s; RSS {rss_warm >> 20} -> {rss_after >> 20} MiB")
    assert len(results) == NUM_REQUESTS
    ids, dropped = set(), 0
    for k, (t, stream, drop) in enumerate(plan):
        status, rid, texts, reasons = results[k]
        if status == "dropped":
            dropped += 1
            continue
        assert status == 200, (status, rid)
        assert rid not in ids, "a response id came twice"
        ids.add(rid)
        assert texts == refs[t], (k, t, stream)
        assert set(reasons) == set(refs[t]) and all(r in ("stop", "length") for r in reasons.values())
    assert dropped >= NUM_REQUESTS * 0.5 * DROP_FRACTION * 0.7

    def delta(name):
        return after[name] - before[name]

    finished = sum(
        delta(f'fastserve:request_success_total{{finished_reason="{r}"}}') for r in ("stop", "length", "abort")
    )
    assert finished == NUM_REQUESTS  # every request reached the engine's end exactly once
    assert delta('fastserve:request_success_total{finished_reason="abort"}') <= dropped
    server_errors = {
        k: v - before.get(k, 0)
        for k, v in after.items()
        if k.startswith("fastserve:http_requests_total") and 'status="5' in k and v != before.get(k, 0)
    }
    assert not server_errors
    assert after["fastserve:num_free_blocks"] == after["fastserve:num_total_blocks"]
    assert abs(rss_after - rss_warm) <= 0.1 * rss_warm, (rss_warm, rss_after)


@pytest.mark.timeout(240)
def test_kv_exhaustion_preempts_and_resumes(checkpoint, tmp_path):
    """24 concurrent requests needing up to 5 blocks each against a 24-block cache: the
    scheduler preempts and recomputes, and every request still finishes with its alone
    output."""
    rng = random.Random(99)
    bodies = [
        {
            "prompt": [rng.randrange(100, 100000) for _ in range(rng.randint(20, 40))],
            "max_tokens": 40,
            "ignore_eos": True,
            "temperature": 0.0,
        }
        for _ in range(20)
    ]
    bodies += [
        {
            "prompt": [rng.randrange(100, 100000) for _ in range(30)],
            "max_tokens": 40,
            "ignore_eos": True,
            "temperature": 1.0,
            "seed": i,
            "n": 2,
        }
        for i in range(4)
    ]
    server = ServerProcess(
        checkpoint,
        tmp_path / "server.log",
        "--num-gpu-blocks-override",
        "24",
        "--block-size",
        "16",
        "--max-model-len",
        "256",
        "--no-enable-prefix-caching",
    )

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await server.wait_ready(s)
            refs = []
            for body in bodies:
                status, _, texts, _ = await call(s, server.base, "/v1/completions", body, False, None)
                assert status == 200
                refs.append(texts)
            before = await metrics(s, server.base)
            results = await asyncio.gather(
                *(call(s, server.base, "/v1/completions", b, i % 2 == 1, None) for i, b in enumerate(bodies))
            )
            after = await wait_idle(s, server.base)
            return refs, results, before, after

    try:
        refs, results, before, after = asyncio.run(main())
    finally:
        server.stop()
    assert after["fastserve:num_total_blocks"] == 24
    assert after["fastserve:num_preemptions_total"] > before["fastserve:num_preemptions_total"]
    for ref, (status, _, texts, reasons) in zip(refs, results):
        assert status == 200
        assert texts == ref
        assert set(reasons.values()) == {"length"}
