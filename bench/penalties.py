"""Offline throughput with and without repetition, presence and frequency penalties on every
request, in one engine (dummy weights): the cost of penalties, and (run once per build with
the same arguments) the plain workload's throughput to compare builds within one lease.

    python bench/penalties.py --model bench/configs/llama3-8b --out bench/results/penalties-h200.json

Works with any fastserve build that has LLM / SamplingParams (the build before a change
included), so the same file measures both."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--label", default="", help="recorded with the result (e.g. the build)")
    ap.add_argument("--info", help="device_info JSON to embed")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import fastserve
    from fastserve import LLM, SamplingParams

    rng = np.random.default_rng(0)

    def random_prompts(n: int) -> list[dict]:
        return [{"prompt_token_ids": rng.integers(0, 100_000, args.input_len).tolist()} for _ in range(n)]

    # A fresh prompt set per run: one engine keeps its prefix cache between generate() calls, so
    # a second run over the same prompts would skip their prefill and look faster.
    warmup = random_prompts(8)
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=0.9,
    )
    startup = time.perf_counter() - t0
    base = dict(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    cases = {
        "plain": SamplingParams(**base),
        "penalties": SamplingParams(**base, repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2),
    }
    llm.generate(warmup, cases["penalties"], use_tqdm=False)  # compile what the penalized path uses
    res = {
        "label": args.label,
        "fastserve_file": fastserve.__file__,
        "startup_s": startup,
        "workload": f"{args.num_prompts} x ({args.input_len} in, {args.output_len} out)",
        "cases": {},
    }
    for name, params in cases.items():
        prompts = random_prompts(args.num_prompts)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        res["cases"][name] = {"seconds": dt, "output_tokens": toks, "output_tok_s": toks / dt}
    p, q = res["cases"]["plain"]["output_tok_s"], res["cases"]["penalties"]["output_tok_s"]
    res["penalties_slowdown_pct"] = 100 * (1 - q / p)
    if args.info and os.path.exists(args.info):
        res["device"] = json.loads(Path(args.info).read_text())
    res["git_commit"] = os.environ.get("FASTSERVE_GIT_COMMIT", "unknown")
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(
        f"{args.label:10s} plain {p:9.0f} tok/s   penalties {q:9.0f} tok/s   "
        f"slowdown {res['penalties_slowdown_pct']:5.1f}%"
        f"   startup {startup:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
