"""Argument checks shared by the kernel wrappers: a bad call fails with a ValueError that names
the argument, before Triton can read out of bounds."""

from __future__ import annotations

import torch


def require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")


def require_cuda_or_interpret(t: torch.Tensor, name: str) -> None:
    import os

    require(
        t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1",
        name,
        f"must be a CUDA tensor (got device {t.device}); use kernels.reference on the CPU",
    )


def require_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    require(t.stride(-1) == 1, name, "last dimension must be contiguous; call .contiguous() first")


def require_int_dtype(t: torch.Tensor, name: str, dtypes=(torch.int32, torch.int64)) -> None:
    require(t.dtype in dtypes, name, f"must have dtype in {dtypes}, got {t.dtype}")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact ("ieee") for float32 so that a float32 model on the GPU
    matches the float32 reference (Triton's default for float32 is tf32, ~1e-3 off); the
    half types go to the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"
