"""Applying a step's grammar bitmask to the sampler's logits, on CPU and CUDA.

xgrammar's layout: int32 [C, ceil(V / 32)], bit t % 32 of word t // 32 set when token t is
allowed; `rows` [C] says which logits row each bitmask row belongs to. CUDA runs the Triton
kernel (fastserve.kernels.token_bitmask, one pass over the constrained rows, after the model
and its CUDA-graph replay, before sampling); the CPU runs the torch definition below."""

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
    else:
        apply_token_bitmask_reference(logits, mask.bitmask, mask.rows)
