"""`fastserve bench throughput`: offline throughput, vLLM's `benchmark_throughput.py` /
`vllm bench throughput` with the same flags, workload and report.

    fastserve bench throughput --model M --input-len 64 --output-len 128 --num-prompts 25 \\
        --seed 2024 --dtype float16 --max-model-len 512
    fastserve bench throughput --backend hf --hf-max-batch-size 25 --model M ...
    fastserve bench throughput --model M --dataset ShareGPT_V3_unfiltered_cleaned_split.json

Every request generates exactly its output length (ignore_eos, temperature 1.0, top_p 1.0,
as vLLM's benchmark does). It prints vLLM's line, `Throughput: X requests/s, Y total
tokens/s, Z output tokens/s`, and the token totals; on a GPU also the device's measured
ceilings (copy bandwidth, bf16 matmul rate; measured after the run, or read from --info) and
the roofline lower bound of this workload (fastserve.benchmarks.roofline) with the fraction
of it reached.
`--output-json` writes vLLM's keys (elapsed_time, num_requests, total_num_tokens,
requests_per_second, tokens_per_second) plus the prompt/output token counts and device.

The hf backend runs transformers' `generate` on batches of up to --hf-max-batch-size
prompts (left-padded, batched while the longest prompt + output fits in 2048 tokens, as
vLLM's does), sampling with the same parameters; transformers is needed only for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from fastserve.benchmarks.datasets import SampleRequest, add_dataset_args, get_requests
from fastserve.entrypoints.engine_flags import add_engine_args, engine_args_from_cli

logger = logging.getLogger("fastserve")

# vLLM's HF backend batches while max prompt + max output stays within this many tokens.
_HF_BATCH_TOKEN_LIMIT = 2048


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=["fastserve", "vllm", "hf"],
        default="fastserve",
        help="fastserve (vllm is accepted as its alias, so vLLM command lines run) or "
        "hf (transformers generate, the baseline).",
    )
    add_dataset_args(p)
    p.add_argument("--n", type=int, default=1, help="Sequences generated per prompt.")
    p.add_argument(
        "--hf-max-batch-size",
        type=int,
        default=None,
        help="Largest batch of the hf backend (required with --backend hf).",
    )
    p.add_argument(
        "--disable-detokenize",
        action="store_true",
        help="Do not detokenize outputs (leave detokenization out of the timing).",
    )
    p.add_argument("--output-json", default=None, help="Write the results here as JSON.")
    p.add_argument(
        "--no-device-ceilings",
        action="store_true",
        help="On a GPU, skip measuring the copy bandwidth and matmul rate after the run.",
    )
    p.add_argument(
        "--info",
        default=None,
        help="A device_info JSON measured earlier on this device (python -m "
        "fastserve.benchmarks.device > info.json): its ceilings are used instead of measuring.",
    )
    add_engine_args(p, exclude=("served_model_name", "chat_template", "reasoning_parser"))


def check_args(args: argparse.Namespace) -> None:
    if args.backend == "vllm":
        args.backend = "fastserve"
    if args.backend == "hf" and args.hf_max_batch_size is None:
        raise ValueError("HF max batch size is required for the hf backend: pass --hf-max-batch-size")
    if args.backend != "hf" and args.hf_max_batch_size is not None:
        raise ValueError("--hf-max-batch-size is only for --backend hf")
    if args.hf_max_batch_size is not None and args.hf_max_batch_size < 1:
        raise ValueError("--hf-max-batch-size must be at least 1")
    if args.backend == "hf" and (args.tensor_parallel_size != 1 or args.data_parallel_size != 1):
        raise ValueError("the hf backend runs on one device: drop --tensor-parallel-size / --data-parallel-size")
    if args.n < 1:
        raise ValueError("--n must be at least 1")


def _check_fits(requests: list[SampleRequest], max_model_len: int) -> None:
    worst = max(requests, key=lambda r: r.prompt_len + r.expected_output_len)
    if worst.prompt_len + worst.expected_output_len > max_model_len:
        raise ValueError(
            f"a request needs {worst.prompt_len} prompt + {worst.expected_output_len} output tokens, "
            f"more than max_model_len {max_model_len}: raise --max-model-len or shorten "
            "--input-len / --output-len"
        )


def run_fastserve(requests: list[SampleRequest], n: int, llm, disable_detokenize: bool = False):
    """Seconds for llm.generate over every request, and its outputs."""
    from fastserve import SamplingParams

    _check_fits(requests, llm.engine.model_config.max_model_len)
    prompts = [{"prompt_token_ids": r.prompt_token_ids, "prompt": r.prompt} for r in requests]
    params = [
        SamplingParams(
            n=n,
            temperature=1.0,
            top_p=1.0,
            ignore_eos=True,
            max_tokens=r.expected_output_len,
            detokenize=not disable_detokenize,
        )
        for r in requests
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    return time.perf_counter() - start, outputs


def _hf_dtype(name: str, model_dir: str):
    import torch

    from fastserve.config import _STR_TO_DTYPE, _dtype_from_config

    if name != "auto":
        return _STR_TO_DTYPE[name]
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return _dtype_from_config(json.load(f)) or torch.float32


def run_hf(
    requests: list[SampleRequest],
    model: str,
    tokenizer,
    n: int,
    max_batch_size: int,
    *,
    dtype: str = "auto",
    device: str = "auto",
    load_format: str = "auto",
    seed: int = 0,
    disable_detokenize: bool = False,
    use_tqdm: bool = True,
) -> float:
    """Seconds for transformers' generate over every request, in vLLM's batches."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise ValueError(f"--backend hf needs transformers ({e}): pip install transformers") from None
    from tqdm.auto import tqdm

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    torch_dtype = _hf_dtype(dtype, model)
    torch.manual_seed(seed)
    if load_format == "dummy":  # random weights, like fastserve's --load-format dummy
        with dev:
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=torch_dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(dev)
    hf.eval()
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0
    bar = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
    start = time.perf_counter()
    i = 0
    while i < len(requests):
        batch = [requests[i]]
        max_prompt, max_out = requests[i].prompt_len, requests[i].expected_output_len
        while len(batch) < max_batch_size and i + len(batch) < len(requests):
            nxt = requests[i + len(batch)]
            if max(max_prompt, nxt.prompt_len) + max(max_out, nxt.expected_output_len) > _HF_BATCH_TOKEN_LIMIT:
                break
            batch.append(nxt)
            max_prompt, max_out = max(max_prompt, nxt.prompt_len), max(max_out, nxt.expected_output_len)
        # Left padding with a mask: generation continues from each prompt's real end.
        ids = torch.full((len(batch), max_prompt), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), max_prompt), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, max_prompt - r.prompt_len :] = torch.tensor(r.prompt_token_ids)
            mask[row, max_prompt - r.prompt_len :] = 1
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                do_sample=True,
                num_return_sequences=n,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                use_cache=True,
                max_new_tokens=max_out,
                min_new_tokens=max_out,
                pad_token_id=pad,
            )
        if not disable_detokenize:
            for seq in out[:, max_prompt:].tolist():
                tokenizer.decode(seq)
        bar.update(len(batch))
        i += len(batch)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    bar.close()
    return elapsed


def _device_report(args, requests, backend: str, elapsed: float, max_num_seqs: int) -> dict:
    """The device and, on a GPU, its measured ceilings and this workload's roofline."""
    import torch

    from fastserve.benchmarks.device import describe, device_info

    if args.info:
        with open(args.info, encoding="utf-8") as f:
            info = json.load(f)
    else:
        on_gpu = torch.cuda.is_available() and args.device != "cpu" and not args.no_device_ceilings
        info = device_info(measure=on_gpu)
    report = {"device": info}
    print(describe(info))
    if "copy_bandwidth_gbps" in info and "matmul_bf16_tflops" in info:
        from fastserve.benchmarks.roofline import model_shape, roofline_seconds

        with open(os.path.join(args.model, "config.json"), encoding="utf-8") as f:
            shape = model_shape(json.load(f))
        bytes_per = 4 if args.dtype in ("float32", "float", "fp32") else 2
        bound = roofline_seconds(
            shape,
            [r.prompt_len for r in requests],
            [r.expected_output_len * args.n for r in requests],
            max_num_seqs,
            info["copy_bandwidth_gbps"],
            info["matmul_bf16_tflops"],
            bytes_per,
        )
        report.update(roofline_s=bound, fraction_of_roofline=bound / elapsed)
        print(
            f"Roofline (lower bound) for this workload: {bound:.2f} s; {backend} took {elapsed:.2f} s "
            f"= {100 * bound / elapsed:.0f}% of it"
        )
    return report


def main(args: argparse.Namespace) -> int:
    from fastserve._core import Tokenizer

    check_args(args)
    engine_args = engine_args_from_cli(args)
    tokenizer = Tokenizer(engine_args.tokenizer or engine_args.model)
    with open(os.path.join(engine_args.model, "config.json"), encoding="utf-8") as f:
        model_vocab = json.load(f).get("vocab_size") or tokenizer.vocab_size
    requests = get_requests(
        args, tokenizer, max_model_len=args.max_model_len, vocab_size=min(tokenizer.vocab_size, model_vocab)
    )

    outputs = None
    if args.backend == "fastserve":
        from fastserve.entrypoints.engine_flags import llm_from_cli

        llm = llm_from_cli(args)
        try:
            elapsed, outputs = run_fastserve(requests, args.n, llm, args.disable_detokenize)
        finally:
            llm.shutdown()
    else:
        elapsed = run_hf(
            requests,
            engine_args.model,
            tokenizer,
            args.n,
            args.hf_max_batch_size,
            dtype=args.dtype,
            device=args.device,
            load_format=args.load_format,
            seed=args.seed,
            disable_detokenize=args.disable_detokenize,
        )
    if outputs is not None:
        prompt_tokens = sum(len(o.prompt_token_ids or ()) for o in outputs)
        output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    else:  # vLLM counts the hf backend's work from the requests
        prompt_tokens = sum(r.prompt_len for r in requests)
        output_tokens = sum(r.expected_output_len * args.n for r in requests)
    total = prompt_tokens + output_tokens
    print(
        f"Throughput: {len(requests) / elapsed:.2f} requests/s, {total / elapsed:.2f} total tokens/s, "
        f"{output_tokens / elapsed:.2f} output tokens/s"
    )
    print(f"Total num prompt tokens:  {prompt_tokens}")
    print(f"Total num output tokens:  {output_tokens}")
    report = _device_report(args, requests, args.backend, elapsed, args.max_num_seqs)
    if args.output_json:
        results = {
            "elapsed_time": elapsed,
            "num_requests": len(requests),
            "total_num_tokens": total,
            "requests_per_second": len(requests) / elapsed,
            "tokens_per_second": total / elapsed,
            "total_prompt_tokens": prompt_tokens,
            "total_output_tokens": output_tokens,
            "output_tokens_per_second": output_tokens / elapsed,
            "backend": args.backend,
            "model": engine_args.model,
            "dataset": args.dataset_path or "random",
            **report,
        }
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=4)
    return 0
