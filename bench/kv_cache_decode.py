"""Decode throughput at long context, bf16 KV cache against FP8 (issue 16: >= 1.3x at 16k).

One engine per --kv-cache-dtype, each in its own process (the GPU's memory back between them);
a CPU run (a tiny config) only checks that the script works.
The prompts (--batch of --context random tokens) are prefilled first with max_tokens=1, then
asked again with max_tokens=output_len + 1: the prefix cache holds every prompt block, so the
timed run recomputes only each prompt's last token and the time is the decode steps'.
Reported: decode output tok/s and ms per step, each against the step's bandwidth bound (the
weight bytes plus the KV bytes read at the mean context, over the copy bandwidth measured in
the same run).

    python bench/kv_cache_decode.py --model bench/configs/llama3-8b --context 16000 --batch 16 \
        --out $OUT/kv-cache-decode-llama3-8b-h200.json"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_info import device_info  # noqa: E402  (puts python/ on the path when not installed)


def worker(args) -> dict:
    import numpy as np
    import torch
    from fastserve import LLM, SamplingParams

    cfg = json.load(open(os.path.join(args.model, "config.json")))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, min(cfg["vocab_size"], 100_000), args.context).tolist() for _ in range(args.batch)]
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16" if torch.cuda.is_available() else "float32",
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.context + args.output_len + 16,
        max_num_seqs=args.batch,
        gpu_memory_utilization=0.9,
    )
    startup = time.perf_counter() - t0
    inputs = [{"prompt_token_ids": p} for p in prompts]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    llm.generate(inputs, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(inputs, SamplingParams(max_tokens=args.output_len + 1, ignore_eos=True), use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - t0
    cached = sum(o.num_cached_tokens for o in outs)
    steps = args.output_len + 1
    runner = llm.engine.runner
    return dict(
        kv_cache_dtype=args.kv_cache_dtype,
        cache_dtype=str(runner.kv_caches[0].dtype).replace("torch.", ""),
        kv_blocks=runner.num_blocks,
        startup_s=round(startup, 1),
        elapsed_s=elapsed,
        prompt_tokens_cached=cached,
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
        ms_per_step=elapsed / steps * 1e3,
        decode_tokens_per_s=args.batch * steps / elapsed,
        kv_bytes_per_token=runner._block_bytes() // runner.block_size,
        weight_bytes=sum(p.numel() * p.element_size() for p in runner.model.parameters())
        + sum(b.numel() * b.element_size() for b in runner.model.buffers()),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--context", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--kv-cache-dtypes", default="auto,fp8")
    ap.add_argument("--kv-cache-dtype", help=argparse.SUPPRESS)  # the worker process's one
    ap.add_argument("--info")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.kv_cache_dtype:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    info = json.load(open(args.info)) if args.info else device_info()
    runs = {}
    for kind in args.kv_cache_dtypes.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--context", str(args.context)]
        cmd += ["--batch", str(args.batch), "--output-len", str(args.output_len), "--kv-cache-dtype", kind]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            runs[kind] = dict(error=(proc.stderr or proc.stdout)[-2000:])
            continue
        r = json.loads(line[len("RESULT ") :])
        mean_context = args.context + args.output_len / 2
        step_bytes = r["weight_bytes"] + args.batch * mean_context * r["kv_bytes_per_token"]
        r["bound_ms_per_step"] = step_bytes / (info.get("copy_bandwidth_gbps", float("nan")) * 1e9) * 1e3
        r["fraction_of_bound"] = r["bound_ms_per_step"] / r["ms_per_step"]
        runs[kind] = r
    base = runs.get("auto", {})
    for kind, r in runs.items():
        if kind != "auto" and "decode_tokens_per_s" in r and "decode_tokens_per_s" in base:
            r["speedup_vs_auto"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    report = dict(
        bench="kv_cache_decode",
        command=" ".join(sys.argv),
        device=info,
        workload=dict(context=args.context, batch=args.batch, output_len=args.output_len),
        runs=runs,
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'kv_cache_dtype':<10} {'tok/s':>9} {'ms/step':>8} {'bound':>7} {'x auto':>7}")
    for kind, r in runs.items():
        if "error" in r:
            print(f"{kind:<10} failed: {r['error'][-300:]}")
            continue
        print(
            f"{kind:<10} {r['decode_tokens_per_s']:9.0f} {r['ms_per_step']:8.2f} {r['fraction_of_bound']:7.0%} "
            f"{r.get('speedup_vs_auto', 1.0):7.2f}"
        )


if __name__ == "__main__":
    main()
