"""Rotary position embedding applied in place to q and k.

The caller precomputes cos_sin_cache [max_position, rot_dim] as [cos | sin] halves (vLLM's
layout), so every scaling variant (linear, dynamic NTK, YaRN, Llama-3) is a property of the
cache and this kernel stays one function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import require, require_cuda_or_interpret, require_int_dtype


@triton.jit
def _rotate(x_ptr, stride_h, H, cos, sin, offs_h, offs_r, IS_NEOX: tl.constexpr, HALF: tl.constexpr):
    mask = (offs_h[:, None] < H) & (offs_r[None, :] < HALF)
    if IS_NEOX:
        p1 = x_ptr + offs_h[:, None] * stride_h + offs_r[None, :]
        p2 = p1 + HALF
    else:
        p1 = x_ptr + offs_h[:, None] * stride_h + 2 * offs_r[None, :]
        p2 = p1 + 1
    x1 = tl.load(p1, mask=mask).to(tl.float32)
    x2 = tl.load(p2, mask=mask).to(tl.float32)
    ty = x_ptr.dtype.element_ty
    tl.store(p1, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(p2, (x2 * cos + x1 * sin).to(ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_c,
    HQ,
    HK,
    HAS_K: tl.constexpr,
    IS_NEOX: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HK_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, HALF_PAD)
    rmask = offs_r < HALF
    cos = tl.load(cache_ptr + pos * stride_c + offs_r, mask=rmask).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_c + HALF + offs_r, mask=rmask).to(tl.float32)[None, :]
    _rotate(q_ptr + t * stride_qt, stride_qh, HQ, cos, sin, tl.arange(0, HQ_PAD), offs_r, IS_NEOX, HALF)
    if HAS_K:
        _rotate(k_ptr + t * stride_kt, stride_kh, HK, cos, sin, tl.arange(0, HK_PAD), offs_r, IS_NEOX, HALF)


def _heads_view(x: torch.Tensor, head_size: int, name: str) -> torch.Tensor:
    require(x.dim() in (2, 3), name, f"must be [T, H, D] or [T, H*D], got {tuple(x.shape)}")
    if x.dim() == 2:
        require(x.shape[1] % head_size == 0, name, f"width {x.shape[1]} is not a multiple of head_size {head_size}")
        x = x.view(x.shape[0], -1, head_size)
    require(x.stride(-1) == 1, name, "last dimension must be contiguous")
    return x


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    head_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q [T, Hq, D] (or [T, Hq*D]) and k in place at positions [T]; returns (q, k).

    cos_sin_cache is [max_position, rot_dim] with cos in the first half and sin in the second;
    only the first rot_dim features of each head rotate (partial rotary, e.g. GPT-NeoX).
    is_neox picks the half-split layout (Llama, NeoX) over GPT-J's interleaved pairs.
    head_size is needed only for the flattened [T, H*D] form.
    """
    if head_size is None:
        require(q.dim() == 3, "head_size", "pass head_size when q is flattened to [T, H*D]")
        head_size = q.shape[-1]
    q3 = _heads_view(q, head_size, "q")
    k3 = _heads_view(k, head_size, "k") if k is not None else None
    require_int_dtype(positions, "positions")
    num_tokens = q3.shape[0]
    require(positions.shape == (num_tokens,), "positions", f"must be [T={num_tokens}], got {tuple(positions.shape)}")
    require(k3 is None or k3.shape[0] == num_tokens, "k", f"must have {num_tokens} tokens like q")
    require(
        cos_sin_cache.dim() == 2 and cos_sin_cache.stride(-1) == 1,
        "cos_sin_cache",
        "must be a [max_position, rot_dim] tensor with a contiguous last dim",
    )
    rot = cos_sin_cache.shape[1]
    require(
        rot % 2 == 0 and rot <= head_size, "cos_sin_cache", f"rot_dim {rot} must be even and <= head_size {head_size}"
    )
    require_cuda_or_interpret(q3, "q")
    if num_tokens == 0:
        return q, k
    half = rot // 2
    hk = k3.shape[1] if k3 is not None else 1
    _rotary_kernel[(num_tokens,)](
        positions,
        q3,
        k3 if k3 is not None else q3,
        cos_sin_cache,
        q3.stride(0),
        q3.stride(1),
        k3.stride(0) if k3 is not None else 0,
        k3.stride(1) if k3 is not None else 0,
        cos_sin_cache.stride(0),
        q3.shape[1],
        hk,
        HAS_K=k3 is not None,
        IS_NEOX=bool(is_neox),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        HQ_PAD=triton.next_power_of_2(q3.shape[1]),
        HK_PAD=triton.next_power_of_2(hk),
        num_warps=4,
    )
    return q, k
