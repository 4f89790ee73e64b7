"""Structured-outputs overhead: N concurrent json_schema requests against the same N
unconstrained, in one process on one engine (so the GPU, clocks and KV cache are the same).

    python bench/structured_outputs.py --model bench/configs/llama3-8b --num-prompts 256 \
        --input-len 256 --output-len 256 --out bench/results/structured-outputs-llama3-8b-h200.json

Weights are random (load_format="dummy"); that is still a valid speed test: the grammar
constrains every token (each sampled token is one the mask allowed), and the default schema
cannot be complete within --output-len tokens (an array with minItems 64 of 4-field objects),
so every sequence runs to its last token under the mask. After a warm-up run, the runs go
unconstrained, constrained, unconstrained; the ratio is constrained tok/s over the mean of the two
unconstrained runs. Reported besides: grammar compile time (and xgrammar's tokenizer-info
build), the per-step host time to fill the bitmask (it overlaps the GPU's forward pass), and
a check that every constrained output is accepted token by token by a fresh matcher (the
mask really held, through the CUDA-graph decode path)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_info import device_info  # noqa: E402

ENTRY = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "level": {"enum": ["debug", "info", "warn", "error"]},
        "message": {"type": "string"},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "level", "message", "ok"],
}
LONG_SCHEMA = {
    "type": "object",
    "properties": {"service": {"type": "string"}, "entries": {"type": "array", "items": ENTRY, "minItems": 64}},
    "required": ["service", "entries"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--schema", help="a JSON schema file instead of the built-in one")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--info", help="reuse a device_info JSON measured earlier in the same run")
    args = ap.parse_args()

    from fastserve import LLM, SamplingParams, StructuredOutputsParams

    cuda = torch.cuda.is_available() and args.device != "cpu"
    info = (json.load(open(args.info)) if args.info else device_info()) if cuda else {"device": "cpu"}
    schema = json.load(open(args.schema)) if args.schema else LONG_SCHEMA
    cfg = json.load(open(Path(args.model) / "config.json"))
    rng = np.random.default_rng(args.seed)
    prompts = [
        {"prompt_token_ids": rng.integers(0, min(cfg["vocab_size"], 100_000), args.input_len).tolist()}
        for _ in range(args.num_prompts)
    ]

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        device=args.device,
    )
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=1), use_tqdm=False)
    startup = time.perf_counter() - t0
    mgr = llm.engine.structured

    spec = StructuredOutputsParams(json=schema)
    t0 = time.perf_counter()
    compiled = mgr.compiler.compile(spec)
    first_compile = time.perf_counter() - t0  # includes xgrammar's tokenizer info, built once
    t0 = time.perf_counter()
    mgr.compiler.compile(StructuredOutputsParams(json={**schema, "title": "recompiled"}))
    compile_s = time.perf_counter() - t0

    def run(constrained: bool) -> dict:
        params = [
            SamplingParams(
                temperature=args.temperature,
                max_tokens=args.output_len,
                ignore_eos=True,
                seed=args.seed + i,
                structured_outputs=spec if constrained else None,
            )
            for i in range(args.num_prompts)
        ]
        steps0, secs0, rows0 = mgr.mask_steps, mgr.mask_seconds, mgr.mask_rows
        max0, mgr.max_mask_seconds = mgr.max_mask_seconds, 0.0
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        r = dict(elapsed_s=elapsed, output_tokens=produced, output_tokens_per_s=produced / elapsed)
        if constrained:
            steps = mgr.mask_steps - steps0
            r.update(
                mask_steps=steps,
                mean_mask_rows=(mgr.mask_rows - rows0) / max(steps, 1),
                mean_mask_fill_ms=1e3 * (mgr.mask_seconds - secs0) / max(steps, 1),
                max_mask_fill_ms=1e3 * mgr.max_mask_seconds,
                mean_step_ms=1e3 * elapsed / max(steps, 1),
            )
            r["outputs_accepted_by_grammar"] = _all_accepted(outs, compiled, llm.engine.structured)
        mgr.max_mask_seconds = max(max0, mgr.max_mask_seconds)
        print("constrained" if constrained else "unconstrained", json.dumps(r), flush=True)
        return r

    warmup = run(False)  # first-use costs (allocator growth, lazy kernels) stay out of the comparison
    free1 = run(False)
    constrained = run(True)
    free2 = run(False)
    free_rate = (free1["output_tokens_per_s"] + free2["output_tokens_per_s"]) / 2
    ratio = constrained["output_tokens_per_s"] / free_rate
    result = dict(
        bench="structured_outputs",
        command=" ".join(sys.argv),
        device=info,
        model_config=cfg,
        workload=dict(
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            temperature=args.temperature,
            schema=schema,
        ),
        startup_s=startup,
        first_compile_s=first_compile,
        compile_s=compile_s,
        tokenizer_info_s=mgr.compiler.tokenizer_info_seconds,
        warmup=warmup,
        unconstrained=[free1, free2],
        constrained=constrained,
        constrained_over_unconstrained=ratio,
        target=0.90,
        meets_target=ratio >= 0.90,
    )
    print(
        f"unconstrained {free_rate:.0f} out tok/s | json_schema {constrained['output_tokens_per_s']:.0f} out tok/s "
        f"| ratio {ratio:.3f} (target 0.90) | compile {compile_s * 1e3:.1f} ms | mask fill "
        f"{constrained['mean_mask_fill_ms']:.2f} ms/step (max {constrained['max_mask_fill_ms']:.2f})"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def _all_accepted(outs, compiled, mgr) -> bool:
    """Every output replayed through a fresh matcher: each token allowed where it was sampled."""
    import xgrammar as xgr

    for o in outs:
        m = xgr.GrammarMatcher(compiled, override_stop_tokens=mgr.stop_token_ids or None)
        for t in o.outputs[0].token_ids:
            if m.is_terminated():
                break
            if not m.accept_token(t):
                return False
    return True


if __name__ == "__main__":
    main()
