"""Online serving benchmark on fastserve's client: requests arrive as a Poisson process (or
all at once, `--request-rate inf` / `--arrival burst`) against any OpenAI-compatible server;
reports TTFT, TPOT, ITL and end-to-end latency percentiles, request and token throughput and
errors, as JSON (vLLM's benchmark_serving metrics, same definitions):

  TTFT  time from sending to the first streamed token
  TPOT  (e2e - TTFT) / (output tokens - 1), per request
  ITL   time between successive streamed chunks, pooled over requests

    python bench/serving.py --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --request-rate 1 4 16 inf --input-len 512 --output-len 128 --result out.json

Prompts are random token ids of exactly --input-len tokens (the completions API takes ids),
and `ignore_eos` holds every output at --output-len tokens so runs are comparable; pass
--no-ignore-eos for servers without that vLLM extension."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from fastserve.client import AsyncClient  # noqa: E402


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    v = sorted(values)

    def q(p):
        # linear interpolation between closest ranks (numpy's default)
        x = (len(v) - 1) * p
        lo, hi = math.floor(x), math.ceil(x)
        return v[lo] + (v[hi] - v[lo]) * (x - lo)

    return {"mean": sum(v) / len(v), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": v[-1]}


async def one_request(client: AsyncClient, prompt: list[int], args) -> dict:
    params = {"max_tokens": args.output_len, "temperature": args.temperature,
              "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        params["ignore_eos"] = True
    t0 = time.perf_counter()
    ttft, last, itl, usage = None, None, [], None
    try:
        async for event in client.stream_complete_events(prompt, **params):
            now = time.perf_counter()
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices") or []):
                if ttft is None:
                    ttft = now - t0
                else:
                    itl.append(now - last)
                last = now
    except Exception as e:  # noqa: BLE001 - a failed request is a data point, not a crash
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    e2e = time.perf_counter() - t0
    out_tokens = (usage or {}).get("completion_tokens", len(itl) + (ttft is not None))
    tpot = (e2e - ttft) / (out_tokens - 1) if ttft is not None and out_tokens > 1 else None
    return {"ok": True, "ttft": ttft, "tpot": tpot, "itl": itl, "e2e": e2e,
            "prompt_tokens": (usage or {}).get("prompt_tokens", len(prompt)),
            "output_tokens": out_tokens}


async def run_rate(client: AsyncClient, prompts: list[list[int]], rate: float, args) -> dict:
    rng = random.Random(args.seed)
    tasks = []
    t0 = time.perf_counter()
    for p in prompts:
        tasks.append(asyncio.create_task(one_request(client, p, args)))
        if rate != math.inf:
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)
    return {
        "request_rate": "inf" if rate == math.inf else rate,
        "num_requests": len(results), "completed": len(ok), "errors": len(errors),
        "error_samples": errors[:5], "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "tpot_s": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "e2e_s": percentiles([r["e2e"] for r in ok]),
    }


async def main_async(args) -> dict:
    rng = random.Random(args.seed)
    # Ids in [1000, 30000) are ordinary tokens in every common BPE vocabulary.
    prompts = [[rng.randrange(1000, 30000) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    rates = [math.inf] if args.arrival == "burst" else args.request_rate
    async with AsyncClient(args.base_url, api_key=args.api_key, model=args.model,
                           max_concurrency=args.max_concurrency, timeout=args.timeout,
                           max_retries=0) as client:
        model = args.model or (await client.models())[0]
        client.model = model
        if args.warmup:
            await asyncio.gather(*(one_request(client, p, args) for p in prompts[:args.warmup]))
        runs = []
        for rate in rates:
            r = await run_rate(client, prompts, rate, args)
            print(f"rate {r['request_rate']}: {r['completed']}/{r['num_requests']} ok, "
                  f"{r['output_token_throughput']:.1f} out tok/s, "
                  f"TTFT p50 {_ms(r['ttft_s']['p50'])} ms, TPOT p50 {_ms(r['tpot_s']['p50'])} ms",
                  file=sys.stderr)
            runs.append(r)
    return {"benchmark": "serving", "base_url": args.base_url, "model": model,
            "arrival": args.arrival, "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "ignore_eos": args.ignore_eos,
            "temperature": args.temperature, "seed": args.seed, "runs": runs}


def _ms(x):
    return "-" if x is None else f"{x * 1000:.1f}"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="Default: the first of /v1/models.")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="Requests per second of the Poisson arrivals, one run per value; "
                        "inf sends all at once.")
    p.add_argument("--arrival", choices=["poisson", "burst"], default="poisson",
                   help="burst = every request at t=0 (same as --request-rate inf).")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-concurrency", type=int, default=1024,
                   help="Client-side cap on requests in flight.")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--warmup", type=int, default=2, help="Requests sent before measuring.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result", default=None, help="Write the JSON result here (else stdout).")
    p.add_argument("--info", default=None,
                   help="device_info JSON (bench/device_info.py) measured in the same run, embedded in the result.")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "max_concurrency"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if any(r <= 0 for r in args.request_rate):
        raise SystemExit("--request-rate values must be positive (or inf)")
    result = asyncio.run(main_async(args))
    if args.info:
        result["device"] = json.loads(Path(args.info).read_text())
    text = json.dumps(result, indent=2)
    if args.result:
        Path(args.result).write_text(text + "\n")
    else:
        print(text)
    return 1 if any(r["completed"] == 0 for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
