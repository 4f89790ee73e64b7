"""Applying a step's grammar bitmask to the sampler's logits, on CPU and CUDA.

xgrammar's layout: int32 [C, ceil(V / 32)], bit t % 32 of word t // 32 set when token t is
allowed; `rows` [C] says which logits row each bitmask row belongs to. CUDA runs the Triton
kernel (fastserve.kernels.token_bitmask, one pass over the constrained rows, after the model
and its CUDA-graph replay, before sampling); the CPU runs xgrammar's C++ kernel (the torch
definition below is the specification both are tested against)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


@dataclass
class TokenBitmask:
    """One step's masks on the logits' device: bitmask int32 [C, W], rows int64 [C]."""

    bitmask: torch.Tensor
    rows: torch.Tensor


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [C, vocab_size]: the bitmask unpacked."""
    shifts = _BIT_SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf where token t is not allowed by bitmask[i]."""
    if rows.shape[0] == 0:
        return
    allowed = allowed_tokens(bitmask, logits.shape[1])
    sub = logits.index_select(0, rows)
    sub.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, sub)


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """In place on logits [S, V]."""
    if logits.is_cuda:
        from fastserve.kernels.token_bitmask import apply_token_bitmask as kernel

        kernel(logits, mask.bitmask, mask.rows)
        return
    try:
        import xgrammar as xgr
    except ImportError:
        apply_token_bitmask_reference(logits, mask.bitmask, mask.rows)
        return
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        apply_token_bitmask_reference(logits, mask.bitmask, mask.rows)
        return
    # xgrammar's C++ CPU kernel (5x the torch definition) reads bitmask row = logits row.
    full = torch.full((logits.shape[0], mask.bitmask.shape[1]), -1, dtype=torch.int32)
    full.index_copy_(0, mask.rows, mask.bitmask)
    xgr.apply_token_bitmask_inplace(logits, full, vocab_size=logits.shape[1], indices=mask.rows.tolist(), backend="cpu")
