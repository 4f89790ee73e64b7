"""Where one engine step's time goes: schedule (Rust), execute (model + sampler), update
(Rust), each synchronized, over decode steps of a running batch.

    python bench/profile_step.py --model bench/configs/llama3-8b --batch 1 --steps 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from fastserve import LLM, SamplingParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--torch-profile", action="store_true")
    args = ap.parse_args()
    llm = LLM(
        model=args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096, enforce_eager=args.enforce_eager
    )
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=2 * args.steps + 32, ignore_eos=True)
    for i in range(args.batch):
        eng.add_request(f"p{i}", list(range(100, 100 + args.input_len)), params)
    for _ in range(4):  # prefills done, decodes running
        eng.step()
    phases = {"schedule": [], "execute": [], "update": [], "route": [], "total": []}
    sync = torch.cuda.synchronize

    def one():
        t0 = time.perf_counter()
        batch = eng.scheduler.schedule()
        t1 = time.perf_counter()
        res = eng.runner.execute(batch)
        sync()
        t2 = time.perf_counter()
        now = time.time()
        outs = eng.scheduler.update(res.sampled_token_ids, now)
        t3 = time.perf_counter()
        if outs.num_rows:  # the streamed (server) path; offline requests are final-only
            eng._route_rows(outs, res, now, {})
        t4 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            phases[k].append(v * 1e3)

    for _ in range(args.steps):
        one()
    summary = {k: round(statistics.median(v), 3) for k, v in phases.items()}
    print(json.dumps({"batch": args.batch, "graphs": eng.runner.graphs is not None, "median_ms": summary}))
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                one()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
