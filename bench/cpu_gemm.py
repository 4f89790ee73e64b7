"""float32 matmul on the CPU: torch's F.linear (MKL sgemm) against oneDNN over a weight packed
once (layers/cpu_gemm.py), for the layer shapes of SmolLM2-135M and a Llama-3.2-1B-sized
model, at the row counts a step has (1 and 32 decodes, 256, a 2,048-token prefill chunk), and
for each pack hint (the batch size oneDNN tunes its layout for).

    python bench/cpu_gemm.py --out bench/results/cpu-gemm-<cpu>.json

Each case is the median of interleaved repeats; GFLOP/s = 2 M N K / time. The max error of
each against a float64 product is recorded beside it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # (N, K) of each linear: qkv, o, gate_up, down, lm_head
    "smollm2-135m": [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)],
    "llama-1b": [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)],
}
ROWS = (1, 32, 256, 2048)
HINTS = (1, 32, 256)


def timed(f, reps: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from fastserve.benchmarks.device import git_commit
    from fastserve.layers import cpu_gemm

    torch.manual_seed(0)
    cases = []
    for model, shapes in SHAPES.items():
        for n, k in shapes:
            w = torch.randn(n, k) / k**0.5
            packed = {h: torch.ops.mkldnn._reorder_linear_weight(w, h) for h in HINTS}
            for m in ROWS:
                x = torch.randn(m, k)
                reps = max(3, int(2e8 / (2 * m * n * k)))
                runs: dict[str, list[float]] = {"torch": [], **{f"onednn_hint{h}": [] for h in HINTS}}
                for _ in range(args.repeats):  # interleaved, so drift hits every column alike
                    runs["torch"].append(timed(lambda: F.linear(x, w), reps))
                    for h in HINTS:
                        runs[f"onednn_hint{h}"].append(
                            timed(lambda: torch.ops.mkldnn._linear_pointwise(x, packed[h], None, "none", [], ""), reps)
                        )
                ref = x.double() @ w.double().t()
                err = {
                    "torch": (F.linear(x, w).double() - ref).abs().max().item(),
                    "onednn": (cpu_gemm.linear(x, cpu_gemm.pack(w), None).double() - ref).abs().max().item(),
                }
                flop = 2 * m * n * k
                gflops = {name: flop / statistics.median(t) / 1e9 for name, t in runs.items()}
                best = f"onednn_hint{cpu_gemm.PACK_HINT_ROWS}"
                cases.append(
                    dict(
                        model=model,
                        n=n,
                        k=k,
                        m=m,
                        gflops=gflops,
                        max_abs_err=err,
                        speedup_packed=gflops[best] / gflops["torch"],
                    )  # fmt: skip
                )
                print(
                    f"{model:13s} N={n:6d} K={k:5d} M={m:5d}  torch {gflops['torch']:6.0f}  "
                    + "  ".join(f"h{h} {gflops[f'onednn_hint{h}']:6.0f}" for h in HINTS)
                    + f"  GFLOP/s  ({cases[-1]['speedup_packed']:.2f}x)"
                )
    speedups = [c["speedup_packed"] for c in cases]
    res = {
        "bench": "cpu_gemm",
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
            "cpu_model": next(
                (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
            )
            if os.path.exists("/proc/cpuinfo")
            else "",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "commit": git_commit(),
        "pack_hint_rows": cpu_gemm.PACK_HINT_ROWS,
        "cases": cases,
        "speedup_packed_median": statistics.median(speedups),
        "speedup_packed_min": min(speedups),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"packed oneDNN over F.linear: median {res['speedup_packed_median']:.2f}x, min {min(speedups):.2f}x")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
