"""Faults inside the engine's step loop, on a real server (tiny checkpoint, 127.0.0.1).

A failure that belongs to one request (`RequestError`, injected through EngineArgs.step_hook
on the rows of marked prompts) fails that request alone with a 500 error body (or an error
event once its stream has started) while the requests batched with it finish correctly. A
failure that cannot be attributed (a generic exception from the step, as a device error
would be) ends the process with a non-zero code, after answering every waiting client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import aiohttp
import pytest
from fastserve.engine.engine import RequestError
from server_harness import ServerThread, free_port, subprocess_env, tiny_qwen_checkpoint

pytestmark = pytest.mark.timeout(180)

# Token ids that mark a prompt for the fault hook (rare Qwen ids, inside the vocabulary):
# FAIL_NOW fails the request at its prefill, FAIL_LATER after it has streamed a few tokens.
FAIL_NOW, FAIL_LATER = 151000, 151001
LATER_STEPS = 4


class FaultHook:
    """Raises RequestError for marked requests, one per step (as a per-request fault would)."""

    def __init__(self) -> None:
        self.countdown: dict[str, int] = {}
        self.raised: list[str] = []

    def __call__(self, batch) -> None:
        qsl = batch.query_start_loc
        for r in range(batch.num_seqs):
            rid = batch.request_id(r)
            row = batch.input_ids[qsl[r] : qsl[r + 1]]
            if rid not in self.countdown:
                if FAIL_NOW in row:
                    self.countdown[rid] = 0
                elif FAIL_LATER in row:
                    self.countdown[rid] = LATER_STEPS
                else:
                    continue
            else:
                self.countdown[rid] -= 1
        due = [
            rid
            for rid in (batch.request_id(r) for r in range(batch.num_seqs))
            if self.countdown.get(rid, 1) <= 0 and rid not in self.raised
        ]
        if due:
            self.raised.append(due[0])
            raise RequestError(due[0], "injected per-request fault")


HOOK = FaultHook()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def server(checkpoint):
    s = ServerThread(["--model", str(checkpoint), "--device", "cpu", "--seed", "3"], step_hook=HOOK).start()
    yield s
    s.stop()


async def _post(session, url, body):
    async with session.post(url, json=body) as r:
        return r.status, await r.read()


async def _stream(session, url, body):
    """(status, [parsed events before [DONE]], saw [DONE])."""
    async with session.post(url, json={**body, "stream": True}) as r:
        events, done = [], False
        async for line in r.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                else:
                    events.append(json.loads(data))
        return r.status, events, done


def _metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" in line:
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


async def _wait_idle(session, base, timeout=20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        async with session.get(base + "/metrics") as r:
            m = _metrics(await r.text())
        if (
            m["fastserve:num_requests_running"] == 0
            and m["fastserve:num_requests_waiting"] == 0
            and m["fastserve:num_free_blocks"] == m["fastserve:num_total_blocks"]
        ):
            return m
        assert time.monotonic() < deadline, f"engine not idle: {m}"
        await asyncio.sleep(0.05)


def _prompt(rng_seed: int, n: int) -> list[int]:
    import random

    rng = random.Random(rng_seed)
    return [rng.randrange(100, 50000) for _ in range(n)]


def test_request_fault_fails_alone(server):
    base = server.base_url
    cmpl, chat = base + "/v1/completions", base + "/v1/chat/completions"
    healthy = [
        {"prompt": _prompt(i, 5 + 3 * i), "max_tokens": 6 + i % 5, "temperature": 0, "ignore_eos": True}
        for i in range(16)
    ]

    async def main():
        async with aiohttp.ClientSession() as s:
            # references: each healthy request alone
            refs = []
            for body in healthy:
                status, data = await _post(s, cmpl, body)
                assert status == 200, data
                refs.append(json.loads(data)["choices"][0]["text"])
            poisoned = [
                _post(s, cmpl, {"prompt": _prompt(100, 9) + [FAIL_NOW], "max_tokens": 8}),
                # the marker only as a field value, not in the prompt: not poisoned
                _post(
                    s,
                    chat,
                    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stop_token_ids": [FAIL_NOW]},
                ),
                _stream(s, cmpl, {"prompt": _prompt(101, 7) + [FAIL_LATER], "max_tokens": 40, "ignore_eos": True}),
            ]
            normal = [(_stream if i % 2 else _post)(s, cmpl, body) for i, body in enumerate(healthy)]
            results = await asyncio.gather(*poisoned, *normal)
            idle = await _wait_idle(s, base)
            async with s.get(base + "/health") as r:
                health = r.status
            # still serving after the faults
            status, data = await _post(s, cmpl, healthy[3])
            return refs, results, idle, health, status, data

    refs, results, idle, health, status, data = asyncio.run(main())
    (s1, b1), (s2, _), (s3, events, done) = results[:3]
    err = json.loads(b1)["error"]
    assert s1 == 500 and err["type"] == "server_error" and err["code"] == "request_failed"
    assert set(err) == {"message", "type", "param", "code"}
    assert "injected" not in err["message"]  # details stay in the server log
    assert s2 == 200  # a chat request with the marker only in a field is not poisoned
    # the stream had started: its tokens, then an error event, then [DONE]
    assert s3 == 200 and done
    assert "choices" in events[0] and events[-1]["error"]["code"] == "request_failed"
    for i, (ref, res) in enumerate(zip(refs, results[3:])):
        if i % 2:
            st, evs, dn = res
            assert st == 200 and dn and all("error" not in e for e in evs)
            assert "".join(e["choices"][0]["text"] for e in evs) == ref
        else:
            st, body = res
            assert st == 200, body
            assert json.loads(body)["choices"][0]["text"] == ref
    assert health == 200
    assert status == 200 and json.loads(data)["choices"][0]["text"] == refs[3]
    assert idle["fastserve:num_free_blocks"] == idle["fastserve:num_total_blocks"]
    assert len(HOOK.raised) == 2


_FATAL_SERVER = textwrap.dedent("""
    import asyncio, sys
    from fastserve.server.app import engine_args_from, serve
    from fastserve.server.cli import parse_args

    args = parse_args(sys.argv[1:])
    engine_args = engine_args_from(args)

    def hook(batch):
        # stands in for a device error: not tied to a request, so nothing can be retried
        if {marker} in batch.input_ids:
            raise RuntimeError("simulated unrecoverable device error")

    engine_args.step_hook = hook
    sys.exit(asyncio.run(serve(args, engine_args)))
""")


def test_unrecoverable_fault_exits_nonzero(checkpoint, tmp_path):
    """A step failure that cannot be pinned on one request: every waiting client gets an
    error (no hang), /health stops answering 200, the process exits with code 1."""
    script = tmp_path / "fatal_server.py"
    script.write_text(_FATAL_SERVER.format(marker=FAIL_NOW))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--port",
            str(port),
            "--disable-log-requests",
        ],
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    async def main():
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                try:
                    async with s.get(base + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "server did not become ready"
                await asyncio.sleep(0.1)
            status, _ = await _post(s, base + "/v1/completions", {"prompt": "fine", "max_tokens": 3})
            assert status == 200

            async def waiting_client(body):
                try:
                    if body.get("stream"):
                        st, events, done = await _stream(s, base + "/v1/completions", body)
                        return st, events[-1] if events else None
                    st, data = await _post(s, base + "/v1/completions", body)
                    return st, json.loads(data)
                except aiohttp.ClientConnectionError:
                    return "closed", None

            others = [
                asyncio.ensure_future(
                    waiting_client(
                        {"prompt": _prompt(i, 6), "max_tokens": 200, "ignore_eos": True, "stream": bool(i % 2)}
                    )
                )
                for i in range(4)
            ]
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            fatal = await waiting_client({"prompt": _prompt(9, 5) + [FAIL_NOW], "max_tokens": 4})
            answers = await asyncio.gather(*others)
            return fatal, answers, time.monotonic() - t0

    try:
        fatal, answers, elapsed = asyncio.run(main())
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert code == 1, (tmp_path / "server.log").read_text()[-3000:]
    assert elapsed < 30
    # Every request the dead engine held gets the one EngineDeadError answer: 503 engine_dead
    # (retryable: a supervisor restarts the process), as tests/test_server.py checks too.
    assert fatal[0] == 503 and fatal[1]["error"]["code"] == "engine_dead", fatal
    for status, last in answers:
        # non-streaming: a 503 body; streaming: an error event after the 200
        assert status in (503, 200), status
        assert last is not None and "error" in last, last
    assert "the engine died" in (tmp_path / "server.log").read_text()
