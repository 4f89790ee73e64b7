"""Grammar token masks: logits[rows[i], t] = -inf where bit t of bitmask[i] is 0.

The bitmask is xgrammar's layout: int32 [C, ceil(V / 32)], bit t % 32 of word t // 32 set
when token t is allowed. Rows are the constrained sample rows of the step (C of the S logits
rows), so unconstrained rows cost nothing."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import require, require_cuda_or_interpret, require_int_dtype


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, stride_logits, stride_mask, V, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < V
    words = tl.load(bitmask_ptr + i * stride_mask + offs // 32, mask=in_vocab, other=-1)
    banned = ((words >> (offs % 32)) & 1) == 0
    tl.store(logits_ptr + row * stride_logits + offs, float("-inf"), mask=in_vocab & banned)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place. logits [S, V] (any float dtype, last dim contiguous); bitmask int32
    [C, >= ceil(V / 32)]; rows int32/int64 [C], distinct, in [0, S)."""
    require(logits.dim() == 2, "logits", f"must be [S, V], got {tuple(logits.shape)}")
    require(logits.stride(-1) == 1, "logits", "last dimension must be contiguous")
    require(
        bitmask.dtype == torch.int32 and bitmask.dim() == 2,
        "bitmask",
        f"must be int32 [C, W], got {bitmask.dtype} {tuple(bitmask.shape)}",
    )
    require(bitmask.stride(-1) == 1, "bitmask", "last dimension must be contiguous")
    v = logits.shape[1]
    require(bitmask.shape[1] * 32 >= v, "bitmask", f"{bitmask.shape[1]} words cover fewer than the {v} logits")
    require_int_dtype(rows, "rows")
    require(
        rows.dim() == 1 and rows.shape[0] == bitmask.shape[0],
        "rows",
        f"must be [C] with C = {bitmask.shape[0]} bitmask rows, got {tuple(rows.shape)}",
    )
    require_cuda_or_interpret(logits, "logits")
    c = rows.shape[0]
    if c == 0 or v == 0:
        return
    block = min(4096, triton.next_power_of_2(v))
    _apply_token_bitmask_kernel[(c, triton.cdiv(v, block))](
        logits, bitmask, rows, logits.stride(0), bitmask.stride(0), v, BLOCK=block, num_warps=8 if block >= 2048 else 4
    )
