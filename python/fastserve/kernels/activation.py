"""SwiGLU gate: silu(x[..., :I]) * x[..., I:]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import require, require_cuda_or_interpret


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + offs, mask=mask).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2*I] -> [..., I] = silu(x[..., :I]) * x[..., I:] (vLLM's SiluAndMul)."""
    require(x.dim() >= 1 and x.shape[-1] % 2 == 0, "x", f"last dim must be even (2*I), got {tuple(x.shape)}")
    require_cuda_or_interpret(x, "x")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    require(out.shape == (*x.shape[:-1], inter), "out", f"must be {(*x.shape[:-1], inter)}, got {tuple(out.shape)}")
    out2 = out.view(-1, inter)
    rows = x2.shape[0]
    if rows == 0:
        return out
    block = min(triton.next_power_of_2(inter), 2048)
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
        x2, out2, x2.stride(0), out2.stride(0), inter, BLOCK=block, num_warps=4 if block <= 1024 else 8
    )
    return out
