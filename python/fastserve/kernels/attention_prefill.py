"""Paged prefill attention for mixed batches (prefill chunks, prefix-cache hits, decodes).

Flash-attention-2 forward over the paged cache: each program owns BLOCK_M queries of one head
of one sequence and streams K/V tiles through the block table, so cached prefixes and earlier
chunks are read in place rather than gathered into a contiguous copy. Query i of sequence b
sits at position seq_len - query_len + i. Tiles wholly below the causal diagonal run without
masks; only the one or two tiles that cross it pay for the mask. With PACK > 1 the rows of a
program are PACK query heads of one KV group, so each K/V tile read serves all of them; the
default uses that only for decode-like batches (max_query_len <= 16), where 128 rows of one
head would be mostly padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import fit_shared_memory, shared_memory_bytes
from ._validate import dot_precision, require, require_cuda_or_interpret, require_int_dtype

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    stride_kv,
    bt_row,
    n0,
    offs_n_base,
    offs_d,
    dmask,
    q_pos,
    seq_len,
    BLOCK_SIZE: tl.constexpr,
    stride_blk,
    stride_slot,
    MASKED: tl.constexpr,
    scale_log2,
    DOT_PREC: tl.constexpr,
):
    offs_n = n0 + offs_n_base
    blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=offs_n < seq_len, other=0).to(tl.int64)
    rows = blk * stride_blk + (offs_n % BLOCK_SIZE).to(tl.int64) * stride_slot
    if MASKED:
        kv_mask = (offs_n < seq_len)[:, None] & dmask[None, :]
    else:
        kv_mask = dmask[None, :]
    # An FP8 cache is widened to q's dtype (exact) for the dots; otherwise a no-op.
    k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASKED:
        qk = tl.where(offs_n[None, :] <= q_pos[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale_log2)
    if MASKED:
        # Rows of padding past the query length can see no key at all: keep their max finite.
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(k_base + stride_kv + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


# Per-batch values (block-table width, query blocks) must not pick a specialization, or a new
# batch shape would recompile mid-run.
@triton.jit(do_not_specialize=["stride_bt", "NUM_M_BLOCKS", "scale_log2"])
def _prefill_kernel(
    q_ptr,
    kv_ptr,
    out_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_blk,
    stride_slot,
    stride_kvh,
    stride_bt,
    NUM_M_BLOCKS,
    G: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PACK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # PACK query heads of one KV group share a program (rows head-major: BLOCK_M // PACK tokens
    # of each), so every K/V tile fetched serves PACK times the rows.
    TOK_M: tl.constexpr = BLOCK_M // PACK
    # The longest (latest) query blocks go first so the causal imbalance is not left as a tail.
    mb = NUM_M_BLOCKS - 1 - tl.program_id(0)
    h0 = tl.program_id(1) * PACK
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    m_start = mb * TOK_M
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len
    kvh = h0 // G

    rows = tl.arange(0, BLOCK_M)
    offs_m = m_start + rows % TOK_M
    heads = h0 + rows // TOK_M
    offs_d = tl.arange(0, D_PAD)
    offs_n_base = tl.arange(0, BLOCK_N)
    mmask = offs_m < q_len
    dmask = offs_d < D
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mmask[:, None] & dmask[None, :],
        other=0.0,
    )
    q_pos = ctx + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = kv_ptr + kvh.to(tl.int64) * stride_kvh

    # Keys below the first query's position are visible to every row of this block.
    full_end = ((ctx + m_start) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            stride_kv,
            bt_row,
            n0,
            offs_n_base,
            offs_d,
            dmask,
            q_pos,
            seq_len,
            BLOCK_SIZE,
            stride_blk,
            stride_slot,
            False,
            scale_log2,
            DOT_PREC,
        )
    kv_end = tl.minimum(seq_len, ctx + m_start + TOK_M)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            stride_kv,
            bt_row,
            n0,
            offs_n_base,
            offs_d,
            dmask,
            q_pos,
            seq_len,
            BLOCK_SIZE,
            stride_blk,
            stride_slot,
            True,
            scale_log2,
            DOT_PREC,
        )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )


def _default_config(head_dim_pad: int, device: torch.device, max_query_len: int, group: int) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if max_query_len <= 16:
        # Decode-like batches (1..16 new tokens per sequence): 128-row tiles would be nearly all
        # padding, so pack the query heads of a KV group into the rows instead.
        pack = group & -group  # largest power of two dividing the group
        pack = min(pack, 16)
        block_m = max(16, pack * triton.next_power_of_2(max_query_len))
        return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=3, PACK=pack)
    # Swept on H100 with bench/kernels.py --sweep (head_dim 128, bf16, 8k prompt): 128x128 tiles
    # two stages deep, 354-377 TFLOP/s; 64x64 344-351, 128x64 304-357. Packing 2 heads per
    # program gained 2-5% at 8k-16k and lost 13% at 2k, inside run-to-run noise: not default.
    if head_dim_pad <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim_pad <= 128:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries q [T, Hq, D] over their sequences' paged K/V -> [T, Hq, D].

    query_start_loc int32 [B+1] packs the queries; seq_lens int32 [B] counts each sequence's
    context including its new tokens, whose K/V must already be in kv_cache
    [2, num_blocks, block_size, Hkv, D]; block_tables int32 [B, max_blocks]. max_query_len
    bounds query_start_loc's gaps (a host int, so no device sync; it sizes the grid, so it must
    not be low). config overrides the tile shapes (benchmarks, tests).

    Decode tokens (query length 1) are correct here. Alone (max_query_len <= 16) they run on
    head-packed tiles (64 decodes at 4k context: 0.47 ms on H100, vs 0.36 ms for
    paged_decode_attention); next to long prompts each gets a whole 128-row tile, so route
    them to paged_decode_attention when the batch allows.
    """
    require(q.dim() == 3, "q", f"must be [T, Hq, D], got {tuple(q.shape)}")
    require(
        kv_cache.dim() == 5 and kv_cache.shape[0] == 2,
        "kv_cache",
        f"must be [2, num_blocks, block_size, num_kv_heads, head_dim], got {tuple(kv_cache.shape)}",
    )
    num_tokens, hq, d = q.shape
    _, _, block_size, hkv, dk = kv_cache.shape
    require(dk == d, "kv_cache", f"head_dim {dk} differs from q's {d}")
    require(hq % hkv == 0, "q", f"num_heads {hq} must be a multiple of num_kv_heads {hkv}")
    require(q.stride(-1) == 1 and kv_cache.stride(-1) == 1, "q", "q and kv_cache need a contiguous last dim")
    require_int_dtype(query_start_loc, "query_start_loc", (torch.int32,))
    require_int_dtype(seq_lens, "seq_lens", (torch.int32,))
    require_int_dtype(block_tables, "block_tables", (torch.int32,))
    batch = seq_lens.shape[0]
    require(
        query_start_loc.shape == (batch + 1,),
        "query_start_loc",
        f"must be [B+1={batch + 1}], got {tuple(query_start_loc.shape)}",
    )
    require(
        block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.stride(-1) == 1,
        "block_tables",
        f"must be a contiguous [B={batch}, max_blocks] tensor, got {tuple(block_tables.shape)}",
    )
    require(max_query_len >= 0, "max_query_len", f"must be >= 0, got {max_query_len}")
    require(scale > 0, "scale", f"must be > 0, got {scale}")
    require_cuda_or_interpret(q, "q")
    if out is None:
        out = torch.empty_like(q)
    require(out.shape == q.shape and out.stride(-1) == 1, "out", f"must be {tuple(q.shape)} with a contiguous last dim")
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return out

    d_pad = max(16, triton.next_power_of_2(d))
    cfg = _default_config(d_pad, q.device, int(max_query_len), hq // hkv)
    if q.is_cuda:
        cfg = fit_shared_memory(
            cfg, d_pad, kv_cache.element_size(), shared_memory_bytes(q.device), min_rows_m=max(16, cfg.get("PACK", 1))
        )
    cfg.update(config or {})
    pack = min(cfg.get("PACK", 1), hq // hkv)
    require(
        hq // hkv % pack == 0 and cfg["BLOCK_M"] % pack == 0,
        "config",
        f"PACK {pack} must divide the group size {hq // hkv} and BLOCK_M {cfg['BLOCK_M']}",
    )
    num_m_blocks = triton.cdiv(int(max_query_len), cfg["BLOCK_M"] // pack)
    _prefill_kernel[(num_m_blocks, hq // pack, batch)](
        q,
        kv_cache,
        out,
        query_start_loc,
        seq_lens,
        block_tables,
        float(scale) * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        num_m_blocks,
        G=hq // hkv,
        D=d,
        D_PAD=d_pad,
        BLOCK_SIZE=block_size,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        PACK=pack,
        DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out
