"""Scatter the new tokens' keys and values into the paged KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import require, require_cuda_or_interpret, require_int_dtype
from .reference import FP8_DTYPES


@triton.jit
def _write_kv_cache_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kv,
    stride_slot,
    stride_ch,
    H: tl.constexpr,
    D: tl.constexpr,
    H_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    SATURATE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    # Padded tokens (CUDA-graph batches) carry slot -1 and must not touch the cache.
    if slot >= 0:
        offs_h = tl.arange(0, H_PAD)
        offs_d = tl.arange(0, D_PAD)
        mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        dst = cache_ptr + slot * stride_slot + offs_h[:, None] * stride_ch + offs_d[None, :]
        ty = cache_ptr.dtype.element_ty
        if SATURATE > 0:  # an FP8 cache: clamp to its largest finite value (reference.to_cache_dtype)
            k = tl.minimum(tl.maximum(k.to(tl.float32), -SATURATE), SATURATE)
            v = tl.minimum(tl.maximum(v.to(tl.float32), -SATURATE), SATURATE)
        tl.store(dst, k.to(ty), mask=mask)
        tl.store(dst + stride_kv, v.to(ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache[0/1] at slot_mapping[t] = k/v[t] for k, v [T, Hkv, D]; slots < 0 are skipped.

    kv_cache is [2, num_blocks, block_size, Hkv, D] and slot = block_id * block_size + offset;
    an FP8 cache (kv_cache_dtype="fp8") stores the values saturated and rounded to it.
    """
    require(
        kv_cache.dim() == 5 and kv_cache.shape[0] == 2,
        "kv_cache",
        f"must be [2, num_blocks, block_size, num_kv_heads, head_dim], got {tuple(kv_cache.shape)}",
    )
    _, _, block_size, hkv, d = kv_cache.shape
    require(
        k.dim() == 3 and tuple(k.shape[1:]) == (hkv, d),
        "k",
        f"must be [T, {hkv}, {d}] to match kv_cache, got {tuple(k.shape)}",
    )
    require(v.shape == k.shape, "v", f"must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    require_int_dtype(slot_mapping, "slot_mapping")
    require(
        slot_mapping.shape == (k.shape[0],),
        "slot_mapping",
        f"must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}",
    )
    require(k.stride(-1) == 1 and v.stride(-1) == 1, "k", "k and v need a contiguous last dim")
    require(
        kv_cache.stride(-1) == 1 and kv_cache.stride(1) == block_size * kv_cache.stride(2),
        "kv_cache",
        "blocks must be laid out contiguously (slot indexing); allocate it with torch.empty",
    )
    require_cuda_or_interpret(kv_cache, "kv_cache")
    if k.shape[0] == 0:
        return
    _write_kv_cache_kernel[(k.shape[0],)](
        k,
        v,
        kv_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        H=hkv,
        D=d,
        H_PAD=triton.next_power_of_2(hkv),
        D_PAD=triton.next_power_of_2(d),
        SATURATE=torch.finfo(kv_cache.dtype).max if kv_cache.dtype in FP8_DTYPES else 0.0,
        num_warps=4,
    )
