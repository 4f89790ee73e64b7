"""`fastserve bench latency`: how long one engine step takes, for a sweep of batch sizes
(vLLM's `vllm bench latency` measures the whole batch; this reports that too).

    fastserve bench latency --model M --input-len 32 --output-len 128 --batch-size 1 8 32 128

For each batch size B, one iteration runs B requests of --input-len random prompt tokens,
each generating exactly --output-len tokens, and times every engine step: the prefill (from
the start until every request has its first token) and each decode step after it (all B
sequences one token further). After --num-iters-warmup untimed iterations, --num-iters
timed ones give, per batch size: vLLM's `Avg latency` of the whole batch and its
percentiles, the prefill latency, the decode step latency percentiles (ms), and decode
tokens/s (B / step time). --output-json writes them all.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fastserve.entrypoints.engine_flags import add_engine_args

_PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=32, help="Prompt tokens per request.")
    p.add_argument("--output-len", type=int, default=128, help="Tokens generated per request.")
    p.add_argument(
        "--batch-size", type=int, nargs="+", default=[8], help="Batch sizes to sweep (one measurement per value)."
    )
    p.add_argument("--n", type=int, default=1, help="Sequences generated per prompt.")
    p.add_argument("--num-iters-warmup", type=int, default=10, help="Untimed iterations per batch size.")
    p.add_argument("--num-iters", type=int, default=30, help="Timed iterations per batch size.")
    p.add_argument("--output-json", default=None, help="Write the results here as JSON.")
    add_engine_args(p, exclude=("served_model_name", "chat_template", "reasoning_parser"))


def _check(args) -> None:
    for name in ("input_len", "output_len", "n", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_iters_warmup < 0:
        raise ValueError("--num-iters-warmup must be >= 0")
    if any(b < 1 for b in args.batch_size):
        raise ValueError("--batch-size values must be at least 1")
    if args.data_parallel_size != 1:
        raise ValueError("bench latency times one engine's steps: drop --data-parallel-size")
    if args.max_num_seqs < max(args.batch_size) * args.n:
        args.max_num_seqs = max(args.batch_size) * args.n  # a batch must run as one


def run_iteration(engine, prompts: list[list[int]], params, tag: str) -> dict:
    """One batch through the engine, each step timed: (total s, prefill s, decode step s list)."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    started = set()
    prefill_s = None
    decode: list[float] = []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        s0 = time.perf_counter()
        states = engine.step()
        s1 = time.perf_counter()
        if prefill_s is None:
            started.update(st.request_id for st in states)
            if len(started) == len(ids):
                prefill_s = s1 - t0
        else:
            decode.append(s1 - s0)
    total = time.perf_counter() - t0
    return {"total_s": total, "prefill_s": prefill_s if prefill_s is not None else total, "decode_s": decode}


def _pcts(values: list[float]) -> dict:
    if not values:
        return {}
    return {str(p): float(np.percentile(values, p)) for p in _PERCENTILES}


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fastserve import SamplingParams
    from fastserve.benchmarks.datasets import sample_random
    from fastserve.entrypoints.engine_flags import llm_from_cli

    _check(args)
    llm = llm_from_cli(args)
    try:
        engine = llm.engine
        limit = engine.model_config.max_model_len
        if args.input_len + args.output_len > limit:
            raise ValueError(
                f"--input-len + --output-len ({args.input_len + args.output_len}) exceeds "
                f"max_model_len {limit}: raise --max-model-len or shorten them"
            )
        params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
        vocab = min(engine.tokenizer.vocab_size, engine.model_config.vocab_size)
        results = []
        for b in args.batch_size:
            prompts = [
                r.prompt_token_ids
                for r in sample_random(engine.tokenizer, b, args.input_len, 1, seed=args.seed, vocab_size=vocab)
            ]
            for i in tqdm(range(args.num_iters_warmup), desc=f"Warmup (batch {b})", leave=False):
                run_iteration(engine, prompts, params, f"w{b}-{i}")
            iters = [
                run_iteration(engine, prompts, params, f"t{b}-{i}")
                for i in tqdm(range(args.num_iters), desc=f"Profiling (batch {b})", leave=False)
            ]
            latencies = [it["total_s"] for it in iters]
            decode = [s for it in iters for s in it["decode_s"]]
            step_ms = _pcts([s * 1000 for s in decode])
            r = {
                "batch_size": b,
                "avg_latency": float(np.mean(latencies)),
                "latencies": latencies,
                "percentiles": _pcts(latencies),
                "prefill_latency_s": float(np.mean([it["prefill_s"] for it in iters])),
                "decode_steps": len(decode) / len(iters),
                "decode_step_ms": {"mean": float(np.mean(decode) * 1000), **step_ms} if decode else {},
                "decode_tokens_per_s": (b * args.n / float(np.median(decode))) if decode else None,
            }
            results.append(r)
            print(f"Batch size {b}: Avg latency: {r['avg_latency']:.4f} seconds")
            for p, v in r["percentiles"].items():
                print(f"  {p}% percentile latency: {v:.4f} seconds")
        print(
            f"{'batch':>6} {'prefill ms':>11} {'step p50 ms':>12} {'step p90 ms':>12} {'step p99 ms':>12} "
            f"{'decode tok/s':>13}"
        )
        for r in results:
            d = r["decode_step_ms"]
            tps = r["decode_tokens_per_s"]
            print(
                f"{r['batch_size']:>6} {r['prefill_latency_s'] * 1000:>11.2f} {d.get('50', float('nan')):>12.3f} "
                f"{d.get('90', float('nan')):>12.3f} {d.get('99', float('nan')):>12.3f} "
                f"{(tps if tps is not None else float('nan')):>13.1f}"
            )
    finally:
        llm.shutdown()
    if args.output_json:
        out = {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "n": args.n,
            "num_iters": args.num_iters,
            "model": args.model,
            "results": results,
        }
        if len(results) == 1:  # vLLM's top-level keys for a single batch size
            out.update({k: results[0][k] for k in ("avg_latency", "latencies", "percentiles")})
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=4)
    return 0
