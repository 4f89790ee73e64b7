"""Offline throughput: N prompts (fixed or uniform-random lengths), fastserve vs HF
transformers `generate` (static batches), against a roofline lower bound for the workload.
The repository's GPU benchmark behind bench/results/throughput-*.json (startup, peak memory,
the roofline fraction); the installed `fastserve bench throughput` is the vLLM-style command
and shares the roofline and device measurements (fastserve.benchmarks.roofline / .device).

    python bench/throughput.py --model bench/configs/llama3-8b --num-prompts 1000 \
        --input-len 512 --output-len 256 --backends fastserve,hf --out bench/results/x.json

The model directory needs config.json and tokenizer files; weights are random
(load_format="dummy"), so only speed is meaningful. The roofline bound: prefill FLOPs over
the measured bf16 matmul rate, plus for each decode step max(weight + KV bytes over the
measured copy bandwidth, step FLOPs over the matmul rate), with the batch as large as
max_num_seqs allows."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_info import device_info  # noqa: E402  (puts python/ on the path when not installed)
from fastserve.benchmarks.roofline import model_shape, roofline_seconds  # noqa: E402,F401


def make_workload(args, vocab: int):
    rng = np.random.default_rng(args.seed)
    n = args.num_prompts
    if args.random_range:
        lo, hi = args.random_range
        in_lens = rng.integers(lo, hi + 1, n)
        out_lens = rng.integers(lo, hi + 1, n)
    else:
        in_lens = np.full(n, args.input_len)
        out_lens = np.full(n, args.output_len)
    prompts = [rng.integers(0, min(vocab, 100_000), int(k)).tolist() for k in in_lens]
    return prompts, in_lens.tolist(), out_lens.tolist()


def run_fastserve(args, prompts, out_lens):
    from fastserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        **({"quantization": args.quantization} if args.quantization else {}),
    )
    # Startup = construction + the first token of a one-token request (graphs captured).
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=1), use_tqdm=False)
    startup = time.perf_counter() - t0
    params = [
        SamplingParams(temperature=args.temperature, max_tokens=int(o), ignore_eos=True, seed=args.seed + i)
        for i, o in enumerate(out_lens)
    ]
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=not args.quiet)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(out_lens), "every request must produce exactly max_tokens"
    free, total = torch.cuda.mem_get_info()
    return dict(
        elapsed_s=elapsed,
        startup_s=startup,
        output_tokens=produced,
        peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
        device_used_gib=(total - free) / 2**30,
        preemptions=llm.engine.scheduler.num_preemptions,
        kv_blocks=llm.engine.runner.num_blocks,
    )


def run_hf(args, prompts, out_lens):
    """transformers generate in static batches of --hf-batch (same-length prompts only:
    padding would change the work); --hf-max-prompts caps the run, tokens/s is the rate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(args.model)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    model.eval()
    startup = time.perf_counter() - t0
    n = min(len(prompts), args.hf_max_prompts)
    if len(set(len(p) for p in prompts[:n])) != 1 or len(set(out_lens[:n])) != 1:
        return dict(skipped="hf backend runs fixed-length workloads only")
    out_len = int(out_lens[0])
    gen_kw = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0)
    warm = torch.tensor(prompts[:2], device="cuda")
    model.generate(warm, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    produced = 0
    for s in range(0, n, args.hf_batch):
        ids = torch.tensor(prompts[s : s + args.hf_batch], device="cuda")
        with torch.no_grad():
            out = model.generate(ids, **gen_kw)
        produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return dict(
        elapsed_s=elapsed,
        startup_s=startup,
        output_tokens=produced,
        prompts_run=n,
        batch=args.hf_batch,
        peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument(
        "--random-range",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        help="input and output lengths uniform in [LO, HI] instead of fixed",
    )
    ap.add_argument("--backends", default="fastserve,hf")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--hf-batch", type=int, default=128)
    ap.add_argument("--hf-max-prompts", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quantization",
        help="e.g. awq, gptq, fp8: random weights in that format's layout "
        "(the roofline stays the bf16 one, so the fraction compares against unquantized weights)",
    )
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--info", help="reuse a device_info JSON measured earlier in the same run")
    args = ap.parse_args()

    info = json.load(open(args.info)) if args.info else device_info()
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    shape = model_shape(cfg)
    prompts, in_lens, out_lens = make_workload(args, cfg["vocab_size"])
    bound = roofline_seconds(
        shape, in_lens, out_lens, args.max_num_seqs, info["copy_bandwidth_gbps"], info["matmul_bf16_tflops"]
    )
    result = dict(
        bench="throughput",
        command=" ".join(sys.argv),
        quantization=args.quantization,
        device=info,
        model_config=cfg,
        shape=shape,
        workload=dict(
            num_prompts=len(prompts),
            input_tokens=int(sum(in_lens)),
            output_tokens=int(sum(out_lens)),
            random_range=args.random_range,
            input_len=args.input_len,
            output_len=args.output_len,
        ),
        roofline_s=bound,
        backends={},
    )
    for backend in args.backends.split(","):
        r = run_fastserve(args, prompts, out_lens) if backend == "fastserve" else run_hf(args, prompts, out_lens)
        if "elapsed_s" in r:
            n_req = r.get("prompts_run", len(prompts))
            in_tok = sum(in_lens[:n_req])
            r.update(
                requests_per_s=n_req / r["elapsed_s"],
                output_tokens_per_s=r["output_tokens"] / r["elapsed_s"],
                input_tokens_per_s=in_tok / r["elapsed_s"],
                total_tokens_per_s=(in_tok + r["output_tokens"]) / r["elapsed_s"],
            )
            if backend == "fastserve":
                r["fraction_of_roofline"] = bound / r["elapsed_s"]
        result["backends"][backend] = r
        print(backend, json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}), flush=True)
    fs, hf = result["backends"].get("fastserve", {}), result["backends"].get("hf", {})
    if "output_tokens_per_s" in fs and "output_tokens_per_s" in hf:
        result["speedup_vs_hf"] = fs["output_tokens_per_s"] / hf["output_tokens_per_s"]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"roofline {bound:.1f} s | "
        + " | ".join(f"{b}: {r.get('output_tokens_per_s', 0):.0f} out tok/s" for b, r in result["backends"].items())
    )


if __name__ == "__main__":
    main()
