"""What a benchmark ran on, and the two ceilings its numbers are judged against.

`device_info()` returns the GPU's name and size, the software versions, the git commit (of the
checkout fastserve runs from; "unknown" for an installed wheel), and two measured limits:
copy bandwidth (a large device-to-device copy, bytes read + written) and the bf16 matmul
rate. `bench/device_info.py` in the repository re-exports this module.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]  # python/fastserve/benchmarks -> the checkout


def time_cuda(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of fn() timed with CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure_copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """GB/s (1e9) of one large device-to-device copy, counting bytes read plus bytes written."""
    # Random data, sized far past L2, so neither compression nor the cache flatters the number.
    src = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup=3, iters=20)  # noqa: F821 (deleted after)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """TFLOP/s of an n x n x n matmul on random data (zeros run faster than real data)."""
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    ms = time_cuda(lambda: a @ b, warmup=5, iters=20)  # noqa: F821 (deleted after)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / (ms * 1e-3) / 1e12


def git_commit() -> str:
    """HEAD (+ '-dirty' with local changes); FASTSERVE_GIT_COMMIT wins, for copies without .git."""
    if os.environ.get("FASTSERVE_GIT_COMMIT"):
        return os.environ["FASTSERVE_GIT_COMMIT"]
    if not (REPO / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_info(measure: bool = True) -> dict:
    info = {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if not torch.cuda.is_available():
        info["gpu"] = None
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(
        gpu=props.name,
        sm_count=props.multi_processor_count,
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        compute_capability=f"{props.major}.{props.minor}",
    )
    if measure:
        info["copy_bandwidth_gbps"] = round(measure_copy_bandwidth_gbps(), 1)
        info["matmul_bf16_tflops"] = round(measure_matmul_tflops(), 1)
    return info


def describe(info: dict) -> str:
    """One line for a terminal: the GPU and its measured ceilings."""
    if not info.get("gpu"):
        return "Device: CPU (no CUDA GPU): no ceilings measured"
    line = f"Device: {info['gpu']} ({info['gpu_memory_gib']} GiB, {info['sm_count']} SMs)"
    if "copy_bandwidth_gbps" in info:
        line += (
            f": measured copy bandwidth {info['copy_bandwidth_gbps']:,.0f} GB/s, "
            f"bf16 matmul {info['matmul_bf16_tflops']:,.0f} TFLOP/s"
        )
    return line


if __name__ == "__main__":
    json.dump(device_info(measure="--no-measure" not in sys.argv), sys.stdout, indent=2)
    print()
