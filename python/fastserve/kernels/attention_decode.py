"""Paged decode attention: one new query token per sequence against its paged K/V.

Flash-decoding: the context is cut into splits so that short batches of long sequences still
fill the GPU; each program computes a partial softmax over one split for all query heads that
share a KV head (loading each K/V tile once per group, not once per query head), and a second
kernel merges the splits by their log-sum-exp. With one split the first kernel writes the
output directly and the merge is skipped.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._tiles import fit_shared_memory, shared_memory_bytes
from ._validate import dot_precision, require, require_cuda_or_interpret, require_int_dtype

LOG2E = 1.4426950408889634
# Below this many tokens per split, the merge and per-program setup cost more than the extra
# parallelism gains.
MIN_SPLIT_TOKENS = 256


# Per-batch values (block-table width, split length) must not pick a specialization, or a new
# batch shape would recompile mid-run.
@triton.jit(do_not_specialize=["stride_bt", "split_len", "scale_log2"])
def _decode_partial_kernel(
    q_ptr,
    kv_ptr,
    bt_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    split_len,
    stride_qb,
    stride_qh,
    stride_kv,
    stride_blk,
    stride_slot,
    stride_kvh,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    heads = kvh * G + offs_g
    gmask = offs_g < G
    dmask = offs_d < D
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = kv_ptr + kvh.to(tl.int64) * stride_kvh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        rows = blk * stride_blk + (offs_n % BLOCK_SIZE).to(tl.int64) * stride_slot
        kv_mask = nmask[:, None] & dmask[None, :]
        # An FP8 cache is widened to q's dtype (exact) for the dots; otherwise a no-op.
        k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(k_base + stride_kv + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    # An empty range (seq_len 0, e.g. a CUDA-graph padding slot) leaves l_i = 0: write zeros.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=omask,
        )
    else:
        # Splits past the end of this sequence write nothing; the merge never reads them.
        # Compared as a block, not as a scalar: Triton 3.7+'s interpreter (TRITON_INTERPRET=1)
        # broadcasts a scalar comparison as int32, which its masked store refuses.
        gvalid = gmask & (start + offs_g * 0 < seq_len)
        base = b.to(tl.int64) * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(part_out_ptr + base[:, None] * D_PAD + offs_d[None, :], out, mask=omask & gvalid[:, None])
        tl.store(part_lse_ptr + base, m_i + tl.log2(l_safe), mask=gvalid)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    split_len,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    num_valid = tl.cdiv(seq_len, split_len)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    smask = offs_s < num_valid
    base = b.to(tl.int64) * stride_pb + h * stride_ph + offs_s * stride_ps
    lse = tl.load(part_lse_ptr + base, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(num_valid > 0, m, 0.0)
    w = tl.where(smask, tl.exp2(lse - m), 0.0)
    parts = tl.load(part_out_ptr + base[:, None] * D_PAD + offs_d[None, :], mask=smask[:, None], other=0.0)
    denom = tl.sum(w, axis=0)
    denom = tl.where(denom > 0, denom, 1.0)
    out = tl.sum(parts * w[:, None], axis=0) / denom
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D
    )


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter runs: a small number still exercises the split path
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _default_config(head_dim_pad: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)  # interpreter: several tiles per split
    # Swept on H100 (bench/kernels.py --sweep): 64-token tiles four stages deep reach the copy
    # bandwidth at batch >= 64; larger heads halve the tile to stay in registers.
    if head_dim_pad <= 128:
        return dict(BLOCK_N=64, num_warps=4, num_stages=4)
    return dict(BLOCK_N=32, num_warps=4, num_stages=2)


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, D] over each sequence's seq_lens[b] cached tokens -> [B, Hq, D].

    kv_cache [2, num_blocks, block_size, Hkv, D] (Hq a multiple of Hkv: MHA, GQA, MQA);
    block_tables int32 [B, max_blocks]; seq_lens int32 [B] (including the new token, whose K/V
    must already be in the cache). max_seq_len bounds seq_lens and sizes the splits without a
    device sync; it defaults to max_blocks * block_size, which keeps the call CUDA-graph safe.
    num_splits and config override the heuristics (tests and benchmarks).
    """
    require(q.dim() == 3, "q", f"must be [B, Hq, D], got {tuple(q.shape)}")
    require(
        kv_cache.dim() == 5 and kv_cache.shape[0] == 2,
        "kv_cache",
        f"must be [2, num_blocks, block_size, num_kv_heads, head_dim], got {tuple(kv_cache.shape)}",
    )
    batch, hq, d = q.shape
    _, _, block_size, hkv, dk = kv_cache.shape
    require(dk == d, "kv_cache", f"head_dim {dk} differs from q's {d}")
    require(hq % hkv == 0, "q", f"num_heads {hq} must be a multiple of num_kv_heads {hkv}")
    require(q.stride(-1) == 1 and kv_cache.stride(-1) == 1, "q", "q and kv_cache need a contiguous last dim")
    require_int_dtype(block_tables, "block_tables", (torch.int32,))
    require_int_dtype(seq_lens, "seq_lens", (torch.int32,))
    require(
        block_tables.dim() == 2 and block_tables.shape[0] == batch,
        "block_tables",
        f"must be [B={batch}, max_blocks], got {tuple(block_tables.shape)}",
    )
    require(block_tables.stride(-1) == 1, "block_tables", "last dimension must be contiguous")
    require(seq_lens.shape == (batch,), "seq_lens", f"must be [B={batch}], got {tuple(seq_lens.shape)}")
    require(scale > 0, "scale", f"must be > 0, got {scale}")
    require_cuda_or_interpret(q, "q")
    if out is None:
        out = torch.empty_like(q)
    require(out.shape == q.shape and out.stride(-1) == 1, "out", f"must be {tuple(q.shape)} with a contiguous last dim")
    if batch == 0:
        return out

    group = hq // hkv
    d_pad = max(16, triton.next_power_of_2(d))
    # tl.dot needs at least 16 rows; rows past the group are masked.
    g_pad = max(16, triton.next_power_of_2(group))
    cfg = _default_config(d_pad, q.device)
    if q.is_cuda:
        cfg = fit_shared_memory(cfg, d_pad, kv_cache.element_size(), shared_memory_bytes(q.device), rows_m=g_pad)
    cfg.update(config or {})
    block_n = cfg["BLOCK_N"]
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    max_seq_len = max(int(max_seq_len), 1)
    if num_splits is None:
        programs = batch * hkv
        want = max(1, math.ceil(2 * _sm_count(q.device) / programs))
        num_splits = max(1, min(want, math.ceil(max_seq_len / MIN_SPLIT_TOKENS)))
    split_len = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_seq_len, split_len)

    scale_log2 = float(scale) * LOG2E
    common = dict(
        G=group,
        G_PAD=g_pad,
        D=d,
        D_PAD=d_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        DOT_PREC=dot_precision(q.dtype),
    )
    kv_strides = (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3))
    if num_splits == 1:
        _decode_partial_kernel[(batch, hkv, 1)](
            q,
            kv_cache,
            block_tables,
            seq_lens,
            out,
            out,
            out,
            scale_log2,
            split_len,
            q.stride(0),
            q.stride(1),
            *kv_strides,
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            0,
            0,
            0,
            SINGLE_SPLIT=True,
            **common,
        )
        return out

    part_out = torch.empty(batch, hq, num_splits, d_pad, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, hq, num_splits, dtype=torch.float32, device=q.device)
    # part_lse strides equal part_out's divided by d_pad; the kernels index both with them.
    ps = (hq * num_splits, num_splits, 1)
    _decode_partial_kernel[(batch, hkv, num_splits)](
        q,
        kv_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale_log2,
        split_len,
        q.stride(0),
        q.stride(1),
        *kv_strides,
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *ps,
        SINGLE_SPLIT=False,
        **common,
    )
    _decode_merge_kernel[(batch, hq)](
        part_out,
        part_lse,
        seq_lens,
        out,
        split_len,
        *ps,
        out.stride(0),
        out.stride(1),
        D=d,
        D_PAD=d_pad,
        S_PAD=max(2, triton.next_power_of_2(num_splits)),
        num_warps=4,
    )
    return out
