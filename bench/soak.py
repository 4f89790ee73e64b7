"""Soak test: Poisson streaming traffic at a fixed rate for a fixed time, a fraction of
clients hanging up mid-stream; counts lost responses and 5xx, samples server memory.

    python bench/soak.py --base-url http://127.0.0.1:8000 --rate 32 --duration 600 \
        --disconnect-fraction 0.1 --server-pid PID --result bench/results/soak.json

"Lost" = a request that got neither a complete stream (finish_reason and [DONE]) nor an HTTP
error, and that the client did not hang up on itself. Memory: the server's RSS (from /proc)
and the GPU's used memory (nvidia-smi), sampled every --sample-every seconds."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def gpu_used_mib() -> float | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


async def one(session, url, model, rng, args, stats):
    prompt = [rng.randrange(1000, 100000) for _ in range(args.input_len)]
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": args.output_len,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    hang_up_after = rng.randrange(1, args.output_len) if rng.random() < args.disconnect_fraction else None
    t0 = time.perf_counter()
    chunks, finished, done = 0, False, False
    try:
        async with session.post(url, json=body) as resp:
            if resp.status >= 500:
                stats["5xx"] += 1
                return
            if resp.status != 200:
                stats["4xx"] += 1
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    stats["stream_errors"] += 1
                    return
                for c in event.get("choices", []):
                    if c.get("text"):
                        chunks += 1
                        if chunks == 1:
                            stats["ttft"].append(time.perf_counter() - t0)
                    if c.get("finish_reason"):
                        finished = True
                if hang_up_after is not None and chunks >= hang_up_after:
                    resp.close()
                    stats["disconnected"] += 1
                    return
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        stats["client_errors"] += 1
        stats["error_samples"].append(repr(e)[:200])
        return
    if finished and done:
        stats["completed"] += 1
    else:
        stats["lost"] += 1


async def main_async(args):
    stats = {
        "sent": 0,
        "completed": 0,
        "disconnected": 0,
        "lost": 0,
        "5xx": 0,
        "4xx": 0,
        "stream_errors": 0,
        "client_errors": 0,
        "error_samples": [],
        "ttft": [],
    }
    samples = []
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        async with session.get(f"{args.base_url}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        url = f"{args.base_url}/v1/completions"
        tasks = set()
        start = time.perf_counter()
        next_sample = start

        async def metrics():
            async with session.get(f"{args.base_url}/metrics") as r:
                text = await r.text()
            vals = {}
            for line in text.splitlines():
                for key in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
                    if line.startswith(f"fastserve:{key}"):
                        vals[key] = float(line.split()[-1])
            return vals

        while time.perf_counter() - start < args.duration:
            now = time.perf_counter()
            if now >= next_sample:
                samples.append(
                    {
                        "t": round(now - start, 1),
                        "rss_mib": rss_mib(args.server_pid),
                        "gpu_used_mib": gpu_used_mib(),
                        **(await metrics()),
                    }
                )
                next_sample += args.sample_every
            t = asyncio.create_task(one(session, url, model, rng, args, stats))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            stats["sent"] += 1
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)
        samples.append(
            {
                "t": round(time.perf_counter() - start, 1),
                "rss_mib": rss_mib(args.server_pid),
                "gpu_used_mib": gpu_used_mib(),
                **(await metrics()),
            }
        )
    ttft = sorted(stats.pop("ttft"))
    stats["ttft_p50_s"] = ttft[len(ttft) // 2] if ttft else None
    stats["ttft_p99_s"] = ttft[int(len(ttft) * 0.99)] if ttft else None
    rss = [s["rss_mib"] for s in samples if s["rss_mib"]]
    stats["rss_first_last_max_mib"] = (
        rss[1] if len(rss) > 1 else None,
        rss[-1] if rss else None,
        max(rss) if rss else None,
    )
    return {"bench": "soak", "args": vars(args), "stats": stats, "samples": samples}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--disconnect-fraction", type=float, default=0.1)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--server-pid", type=int)
    ap.add_argument("--sample-every", type=float, default=30)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--info", help="device_info JSON from the same run, embedded in the result")
    ap.add_argument("--result")
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    if args.info:
        result["device"] = json.loads(Path(args.info).read_text())
    text = json.dumps(result, indent=1)
    if args.result:
        Path(args.result).write_text(text)
    s = result["stats"]
    print(json.dumps({k: v for k, v in s.items() if k != "error_samples"}))
    return 1 if s["lost"] or s["5xx"] else 0


if __name__ == "__main__":
    sys.exit(main())
