"""`fastserve bench serve`: online serving benchmark on fastserve's client. Requests arrive as
a Poisson process (or all at once, `--request-rate inf` / `--arrival burst`; `--burstiness`
< 1 makes arrivals burstier, > 1 steadier, as vLLM's gamma arrivals) against any
OpenAI-compatible server; one run per `--request-rate` value (a sweep). Reports TTFT, TPOT,
ITL and end-to-end latency percentiles, request and token throughput and errors, as JSON
(vLLM's benchmark_serving metrics, same definitions):

  TTFT  time from sending to the first streamed token
  TPOT  (e2e - TTFT) / (output tokens - 1), per request
  ITL   time between successive streamed chunks, pooled over requests

    fastserve bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --request-rate 1 4 16 inf --input-len 512 --output-len 128 --result out.json --plot out.png
    fastserve bench serve --dataset-path ShareGPT_V3_unfiltered_cleaned_split.json --num-prompts 500 \\
        --request-rate 2 8 --result sharegpt.json

Random prompts are random token ids of exactly --input-len tokens (the completions API takes
ids). ShareGPT prompts are sent as text, each generating its answer's length (or
--output-len); their token counts come from --tokenizer when given, else from the server's
/tokenize. `ignore_eos` holds every output at its length so runs are comparable; pass
--no-ignore-eos for servers without that vLLM extension. `--plot out.png` draws TTFT, TPOT
and output throughput against request rate (needs matplotlib: pip install 'fastserve[plot]').
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path

from fastserve.client import AsyncClient


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


async def one_request(client: AsyncClient, prompt: list[int] | str, output_len: int, args) -> dict:
    params = {"max_tokens": output_len, "temperature": args.temperature, "stream_options": {"include_usage": True}}
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
    return {
        "ok": True,
        "ttft": ttft,
        "tpot": tpot,
        "itl": itl,
        "e2e": e2e,
        "prompt_tokens": (usage or {}).get("prompt_tokens", len(prompt)),
        "output_tokens": out_tokens,
    }


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait after each request: exponential at `rate` (burstiness 1, Poisson), or
    gamma with shape `burstiness` and the same mean (vLLM's --burstiness)."""
    if rate == math.inf:
        return [0.0] * n
    rng = random.Random(seed)
    if burstiness == 1.0:
        return [rng.expovariate(rate) for _ in range(n)]
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


async def run_rate(client: AsyncClient, workload: list[tuple[list[int] | str, int]], rate: float, args) -> dict:
    gaps = arrival_gaps(len(workload), rate, args.burstiness, args.seed)
    tasks = []
    t0 = time.perf_counter()
    for (prompt, out_len), gap in zip(workload, gaps):
        tasks.append(asyncio.create_task(one_request(client, prompt, out_len, args)))
        if gap:
            await asyncio.sleep(gap)
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)
    return {
        "request_rate": "inf" if rate == math.inf else rate,
        "num_requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": errors[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "tpot_s": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "e2e_s": percentiles([r["e2e"] for r in ok]),
    }


class _ServerTokenizer:
    """encode_batch through the server's POST /tokenize (no local tokenizer needed), for
    sample_sharegpt running in a worker thread while the event loop does the HTTP."""

    def __init__(self, session, base_url: str, headers: dict, loop: asyncio.AbstractEventLoop) -> None:
        self.session, self.base_url, self.headers, self.loop = session, base_url, headers, loop

    async def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        async with self.session.post(
            self.base_url + "/tokenize",
            headers=self.headers,
            json={"prompt": text, "add_special_tokens": add_special_tokens},
        ) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise ValueError(f"POST /tokenize answered {r.status}: {body}; pass --tokenizer DIR instead")
            return body["tokens"]

    def encode_batch(self, texts, add_special_tokens=True):
        async def all_():
            return await asyncio.gather(*(self._tokenize(t, add_special_tokens) for t in texts))

        return asyncio.run_coroutine_threadsafe(all_(), self.loop).result()


async def _sharegpt_workload(client: AsyncClient, args) -> list[tuple[str, int]]:
    from fastserve.benchmarks.datasets import sample_sharegpt

    if args.tokenizer:
        from fastserve._core import Tokenizer

        tokenizer = Tokenizer(args.tokenizer)
        samples = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: sample_sharegpt(
                args.dataset_path, tokenizer, args.num_prompts, seed=args.seed, output_len=args.output_len
            ),
        )
    else:
        import aiohttp

        loop = asyncio.get_running_loop()
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        async with aiohttp.ClientSession() as session:
            tokenizer = _ServerTokenizer(session, args.base_url.rstrip("/"), headers, loop)
            samples = await loop.run_in_executor(
                None,
                lambda: sample_sharegpt(
                    args.dataset_path, tokenizer, args.num_prompts, seed=args.seed, output_len=args.output_len, chunk=64
                ),
            )
    return [(s.prompt, s.expected_output_len) for s in samples]


async def main_async(args) -> dict:
    rates = [math.inf] if args.arrival == "burst" else args.request_rate
    async with AsyncClient(
        args.base_url,
        api_key=args.api_key,
        model=args.model,
        max_concurrency=args.max_concurrency,
        timeout=args.timeout,
        max_retries=0,
    ) as client:
        model = args.model or (await client.models())[0]
        client.model = model
        if args.dataset_name == "sharegpt":
            workload = await _sharegpt_workload(client, args)
        else:
            rng = random.Random(args.seed)
            # Ids in [1000, 30000) are ordinary tokens in every common BPE vocabulary.
            workload = [
                ([rng.randrange(1000, 30000) for _ in range(args.input_len)], args.output_len)
                for _ in range(args.num_prompts)
            ]
        if args.warmup:
            await asyncio.gather(*(one_request(client, p, o, args) for p, o in workload[: args.warmup]))
        runs = []
        for rate in rates:
            r = await run_rate(client, workload, rate, args)
            print(
                f"rate {r['request_rate']}: {r['completed']}/{r['num_requests']} ok, "
                f"{r['output_token_throughput']:.1f} out tok/s, "
                f"TTFT p50 {_ms(r['ttft_s']['p50'])} ms, TPOT p50 {_ms(r['tpot_s']['p50'])} ms",
                file=sys.stderr,
            )
            runs.append(r)
    return {
        "benchmark": "serving",
        "base_url": args.base_url,
        "model": model,
        "arrival": args.arrival,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "dataset": args.dataset_path if args.dataset_name == "sharegpt" else "random",
        "burstiness": args.burstiness,
        "runs": runs,
    }


def _ms(x):
    return "-" if x is None else f"{x * 1000:.1f}"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="Model name to request. Default: the first of /v1/models.")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="Tokenizer directory to count ShareGPT tokens (default: the server's /tokenize).",
    )
    p.add_argument(
        "--dataset-name",
        choices=["random", "sharegpt"],
        default=None,
        help="Default: sharegpt when --dataset-path is given, else random.",
    )
    p.add_argument(
        "--dataset-path",
        "--dataset",
        dest="dataset_path",
        default=None,
        help="ShareGPT JSON file (sampled as vLLM samples it).",
    )
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=256)
    p.add_argument(
        "--output-len",
        "--random-output-len",
        dest="output_len",
        type=int,
        default=None,
        help="Tokens per request (default 64 for random prompts; ShareGPT: the answer's length).",
    )
    p.add_argument("--sharegpt-output-len", dest="output_len", type=int, help="Same as --output-len (vLLM's name).")
    p.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="Requests per second of the arrivals, one run per value; inf sends all at once.",
    )
    p.add_argument(
        "--arrival",
        choices=["poisson", "burst"],
        default="poisson",
        help="burst = every request at t=0 (same as --request-rate inf).",
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="Gamma shape of the gaps between arrivals: 1 = Poisson, < 1 burstier, > 1 steadier.",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-concurrency", type=int, default=1024, help="Client-side cap on requests in flight.")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--warmup", type=int, default=2, help="Requests sent before measuring.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--result", "--save-result", dest="result", default=None, help="Write the JSON result here (else stdout)."
    )
    p.add_argument(
        "--plot", default=None, help="Draw TTFT, TPOT and output throughput against request rate into this PNG."
    )
    p.add_argument(
        "--info",
        default=None,
        help="device_info JSON (bench/device_info.py) measured in the same run, embedded in the result.",
    )


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.dataset_name is None:
        args.dataset_name = "sharegpt" if args.dataset_path else "random"
    if args.dataset_name == "sharegpt" and not args.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path (a ShareGPT JSON file)")
    if args.dataset_name == "random" and args.output_len is None:
        args.output_len = 64
    for name in ("num_prompts", "input_len", "max_concurrency"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.output_len is not None and args.output_len < 1:
        raise ValueError("--output-len must be at least 1")
    if any(r <= 0 for r in args.request_rate):
        raise ValueError("--request-rate values must be positive (or inf)")
    if not args.burstiness > 0:
        raise ValueError("--burstiness must be positive")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if args.plot:
        from fastserve.benchmarks.plot import require_matplotlib

        require_matplotlib()


def main(args: argparse.Namespace) -> int:
    check_args(args)
    result = asyncio.run(main_async(args))
    if args.info:
        result["device"] = json.loads(Path(args.info).read_text())
    text = json.dumps(result, indent=2)
    if args.result:
        Path(args.result).write_text(text + "\n")
    else:
        print(text)
    if args.plot:
        from fastserve.benchmarks.plot import plot_serving

        plot_serving(result, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 1 if any(r["completed"] == 0 for r in result["runs"]) else 0
