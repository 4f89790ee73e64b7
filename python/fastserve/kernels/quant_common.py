"""Shared by the quantized GEMMs (quant_gemm.py, quant_fp8.py): split-K planning and the split-K
reduction, dispatch thresholds settable from the environment, and launching a fast variant with
a fallback logged once when it cannot compile on this GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, TypeVar

import torch
import triton
import triton.language as tl

from ._validate import require

logger = logging.getLogger("fastserve.kernels.quant")

T = TypeVar("T")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpret_dispatch() -> bool:
    """Tests: route CPU tensors through the CUDA dispatch (thresholds, fallbacks) and the
    interpreted kernels, so that the GPU-only code path also runs in CI."""
    return interpreting() and os.environ.get("FASTSERVE_QUANT_INTERPRET_DISPATCH") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors the torch path."""
    return t.is_cuda or interpret_dispatch()


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter runs: small, so that tests still take the split-K path
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def plan_split_k(programs: int, k_tiles: int, device: torch.device, *, waves: float = 2.0,
                 min_tiles: int = 2, max_split: int = 16, split: int | None = None) -> tuple[int, int]:
    """(splits, k tiles per split) so that programs * splits fills about `waves` waves of SMs.

    A split keeps at least `min_tiles` K tiles (below that the per-program setup and the
    partial-sum traffic cost more than the parallelism gains). `split` forces a count.
    """
    if split is None:
        want = max(1, -(-int(waves * sm_count(device)) // max(programs, 1)))
        split = max(1, min(want, max_split, k_tiles // max(min_tiles, 1)))
    split = max(1, min(int(split), k_tiles))
    per = -(-k_tiles // split)
    return -(-k_tiles // per), per


# Tests set this: split-K partial buffers start as NaN, so a partial no program wrote shows up.
POISON_SCRATCH = False


def partial_buffer(split: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    if POISON_SCRATCH:
        return torch.full((split, m, n), float("nan"), dtype=torch.float32, device=device)
    return torch.empty(split, m, n, dtype=torch.float32, device=device)


def output_buffer(out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    require(out.shape == (m, n) and out.dtype == dtype and out.stride(-1) == 1, "out",
            f"must be {dtype} [{m}, {n}] with a contiguous last dim, got {out.dtype} {tuple(out.shape)}")
    return out


@triton.jit(do_not_specialize=["M", "SPLIT"])
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om, SPLIT,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = M.to(tl.int64) * N
    mask = offs < total
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0)
    n = offs % N
    m = offs // N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(part: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out [M, N] = sum over splits of part [S, M, N] (float32) + bias, in out's dtype."""
    s, m, n = part.shape
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        part, bias if bias is not None else part, out, m, n, out.stride(0), s,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------- fallback, once

_FAILED: dict[str, str] = {}


def failed_variants() -> dict[str, str]:
    """Kernel variants that failed to compile or launch here, with the error (benchmarks report it)."""
    return dict(_FAILED)


def _sticky_cuda_error(e: BaseException) -> bool:
    msg = str(e)
    return "CUDA error" in msg or "illegal" in msg or "cudaError" in msg


def run_with_fallback(key: str, fast: Callable[[], T], safe: Callable[[], T]) -> T:
    """fast(), unless it failed before under this key; on a failure (a compile error, too
    much shared memory for this GPU, an op this torch build lacks) log once and use safe().

    Callers check their arguments before this. Out-of-memory and CUDA faults propagate: the
    fallback would not fix them (and a fault poisons the context).
    """
    if key in _FAILED:
        return safe()
    try:
        return fast()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any compile/launch failure of an optional fast path
        if _sticky_cuda_error(e) or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            raise
        _FAILED[key] = f"{type(e).__name__}: {str(e)[:400]}"
        logger.warning("quantized GEMM variant %s failed (%s); using the fallback from now on",
                       key, _FAILED[key].splitlines()[0][:200])
        return safe()


# ---------------------------------------------------------------- thresholds from the environment

def apply_overrides(obj, spec: str, what: str) -> None:
    """Set dataclass fields from "name=value,name=value" (ints, floats, true/false, strings)."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise ValueError(f"{what}: unknown setting {item!r}; known: {sorted(fields)}")
        current = getattr(obj, name)
        value = value.strip()
        if isinstance(current, bool):
            parsed = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, int):
            parsed = int(value)
        elif isinstance(current, float):
            parsed = float(value)
        else:
            parsed = value
        setattr(obj, name, parsed)
