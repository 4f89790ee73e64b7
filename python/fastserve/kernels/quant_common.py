"""Shared by the quantized GEMMs (quant_gemm.py, quant_fp8.py): split-K planning and the split-K
reduction, dispatch thresholds settable from the environment, and launching a fast variant with
a fallback logged once when it cannot compile on this GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TypeVar

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


def plan_split_k(
    programs: int,
    k_tiles: int,
    device: torch.device,
    *,
    waves: float = 2.0,
    min_tiles: int = 2,
    max_split: int = 16,
    split: int | None = None,
) -> tuple[int, int]:
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
    require(
        out.shape == (m, n) and out.dtype == dtype and out.stride(-1) == 1,
        "out",
        f"must be {dtype} [{m}, {n}] with a contiguous last dim, got {out.dtype} {tuple(out.shape)}",
    )
    return out


# Split-K in one launch: each split stores its partial tile, then bumps the tile's counter; the
# split that brings it to num_splits sums the partials (in split order: deterministic), writes
# the output and resets the counter for the next launch. This saves the reduction kernel's
# launch, which at batch-1 decode costs as much as a small layer's GEMM. The counters persist
# per device (zeroed once, outside any CUDA-graph capture); GEMMs on one device must not run
# concurrently on two streams (the engine uses one). FASTSERVE_QUANT_SPLITK_FIXUP=0 or a
# config's fixup=False uses the separate reduction kernel instead.
SPLITK_FIXUP = os.environ.get("FASTSERVE_QUANT_SPLITK_FIXUP", "1") != "0"
COUNTER_SLOTS = 8192
_COUNTERS: dict[str, torch.Tensor] = {}


def splitk_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The device's zeroed tile counters, or None (then use splitk_reduce) when there are more
    tiles than slots or the first use would happen inside a CUDA-graph capture."""
    if tiles > COUNTER_SLOTS:
        return None
    key = str(device)
    c = _COUNTERS.get(key)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        c = _COUNTERS[key] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return c


@triton.jit
def store_output(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr):
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def splitk_epilogue(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    pid_k,
    num_splits,
    tile_id,
    part_ptr,
    counter_ptr,
    bias_ptr,
    out_ptr,
    stride_om,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FIXUP: tl.constexpr,
):
    """Write acc [BLOCK_M, BLOCK_N] (float32): directly, as split pid_k's partial, or as the
    partial of the split that finishes the tile and then the reduced output (FIXUP)."""
    if SPLIT:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        plane = M.to(tl.int64) * N
        part = part_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * plane, acc, mask=mask)
        if FIXUP:
            # Every thread's partial store happens before the release of the counter bump.
            tl.debug_barrier()
            done = tl.atomic_add(counter_ptr + tile_id, 1, sem="acq_rel")
            if done == num_splits - 1:
                total = tl.zeros_like(acc)
                for s in range(num_splits):
                    total += tl.load(part + s * plane, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(counter_ptr + tile_id, 0)
                store_output(total, offs_m, offs_n, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS)
    else:
        store_output(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS)


def finish_split(part: torch.Tensor, bias, out: torch.Tensor, fixup: bool) -> torch.Tensor:
    if part.dim() == 3 and part.shape[0] > 1 and not fixup:
        splitk_reduce(part, bias, out)
    return out


def split_setup(split: int, tiles: int, m: int, n: int, out: torch.Tensor, want_fixup: bool | None):
    """(partial buffer or out, counters or out, fixup?) for a launch with `split` splits over
    `tiles` output tiles."""
    if split <= 1:
        return out, out, False
    counters = splitk_counters(out.device, tiles) if (SPLITK_FIXUP if want_fixup is None else want_fixup) else None
    return partial_buffer(split, m, n, out.device), (counters if counters is not None else out), counters is not None


@triton.jit(do_not_specialize=["M", "SPLIT"])
def _splitk_reduce_kernel(
    part_ptr, bias_ptr, out_ptr, M, N, stride_om, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
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
        part,
        bias if bias is not None else part,
        out,
        m,
        n,
        out.stride(0),
        s,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        num_warps=4,
    )
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
        logger.warning(
            "quantized GEMM variant %s failed (%s); using the fallback from now on",
            key,
            _FAILED[key].splitlines()[0][:200],
        )
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
