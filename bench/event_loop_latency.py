"""Does the engine's step thread starve the server's event loop? Measures GET /health
latency (answered on the event loop, no engine work) while the engine is idle and while it
runs a concurrent streaming load, on the same server process.

    python bench/event_loop_latency.py [--model PATH] [--device cpu] --requests 128 \
        --result bench/results/event-loop-latency-cpu.json

If the GIL held by the step thread blocked the loop, /health under load would wait for whole
steps (its latency would approach the step time); a loop that stays responsive answers in
about the idle time. This is the measurement behind the thread-vs-process choice in
DESIGN.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def probe(session, url, n, gap):
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.get(url) as r:
            await r.read()
        lat.append((time.perf_counter() - t0) * 1e3)
        await asyncio.sleep(gap)
    return lat


async def stream_one(session, url, model, i, max_tokens):
    body = {
        "model": model,
        "prompt": f"request {i}: " + "word " * (8 + i % 50),
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    chunks = 0
    async with session.post(url, json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                chunks += 1
    return chunks


async def run(args, base):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(600):
            try:
                async with session.get(f"{base}/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        async with session.get(f"{base}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        idle = await probe(session, f"{base}/health", args.probes, 0.01)
        t0 = time.perf_counter()
        load = asyncio.gather(
            *(stream_one(session, f"{base}/v1/completions", model, i, args.max_tokens) for i in range(args.requests))
        )
        await asyncio.sleep(0.5)  # let the load reach the engine
        busy = await probe(session, f"{base}/health", args.probes, 0.01)
        chunks = await load
        elapsed = time.perf_counter() - t0
    return idle, busy, chunks, elapsed


def summary(v):
    v = sorted(v)
    return {
        "p50_ms": statistics.median(v),
        "p90_ms": v[int(0.9 * (len(v) - 1))],
        "p99_ms": v[int(0.99 * (len(v) - 1))],
        "max_ms": v[-1],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the built-in tiny demo model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--result")
    args = ap.parse_args()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    model_args = ["--model", args.model] if args.model else []
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastserve",
            *model_args,
            "--device",
            args.device,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--disable-log-requests",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        idle, busy, chunks, elapsed = asyncio.run(run(args, f"http://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    steps_per_s = sum(chunks) / elapsed / max(1, min(args.requests, 256))
    result = {
        "bench": "event_loop_latency",
        "command": " ".join(sys.argv),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "stream_chunks": sum(chunks),
        "load_seconds": elapsed,
        "approx_step_ms": 1e3 / steps_per_s if steps_per_s else None,
        "health_idle": summary(idle),
        "health_under_load": summary(busy),
    }
    try:
        result["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    text = json.dumps(result, indent=1)
    if args.result:
        Path(args.result).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
