"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import require, require_cuda_or_interpret


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # Round the sum to the residual dtype before normalizing: that rounded value is what
        # the next layer adds to, and what HF computes the norm from.
        s = x + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = s.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + offs, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask)
    y = (x * rstd).to(out_ptr.dtype.element_ty) * w
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    flat = t.view(-1, t.shape[-1]) if t.is_contiguous() else None
    require(
        flat is not None or (t.dim() == 2 and t.stride(-1) == 1),
        name,
        "must be contiguous or a 2-D tensor with a contiguous last dim",
    )
    return flat if flat is not None else t


def _launch(x, residual, weight, out, eps):
    n = x.shape[-1]
    require(weight.shape == (n,), "weight", f"must be [{n}] (hidden size), got {tuple(weight.shape)}")
    require(eps > 0, "eps", f"must be > 0, got {eps}")
    require_cuda_or_interpret(x, "x")
    x2, o2 = _rows(x, "x"), _rows(out, "out")
    r2 = _rows(residual, "residual") if residual is not None else x2
    if x2.shape[0] == 0:
        return
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        r2,
        weight,
        o2,
        x2.stride(0),
        r2.stride(0),
        o2.stride(0),
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """rmsnorm(x) * weight over the last dim, computed in float32."""
    if out is None:
        out = torch.empty_like(x)
    require(out.shape == x.shape, "out", f"must match x's shape {tuple(x.shape)}")
    _launch(x, None, weight, out, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place, as vLLM's: residual += x, then x = rmsnorm(residual) * weight.

    Returns (x, residual), the same tensors that were passed in.
    """
    require(
        residual.shape == x.shape, "residual", f"must match x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
    )
    _launch(x, residual, weight, x, eps)
    return x, residual
