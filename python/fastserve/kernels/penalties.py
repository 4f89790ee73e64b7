"""Repetition, frequency and presence penalties in one pass over the penalized rows' logits.

The torch definition (layers/sampler.py `_apply_penalties_torch`, kernels/reference.py
`apply_penalties`) gathers the rows, turns the counts to float, builds the seen mask and
scatters back: about a dozen passes over [P, V] per step (P = 256 penalized rows of a 128k
vocabulary is 128 MB a pass). Here each element is read once from the logits, the counts and
the flags, and written once, in place. The arithmetic is the reference's, in its order, with
IEEE division, so the results are bit-identical."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import require, require_cuda_or_interpret, require_int_dtype


@triton.jit
def _apply_penalties_kernel(
    logits_ptr,
    counts_ptr,
    flags_ptr,
    rows_ptr,
    vocab_rows_ptr,
    rep_ptr,
    freq_ptr,
    pres_ptr,
    V,
    stride_logits,
    stride_counts,
    stride_flags,
    PROMPT_BIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    vrow = tl.load(vocab_rows_ptr + i).to(tl.int64)
    rep = tl.load(rep_ptr + row)
    freq = tl.load(freq_ptr + row)
    pres = tl.load(pres_ptr + row)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    x = tl.load(logits_ptr + row * stride_logits + offs, mask=mask, other=0.0)
    c = tl.load(counts_ptr + vrow * stride_counts + offs, mask=mask, other=0).to(tl.float32)
    f = tl.load(flags_ptr + vrow * stride_flags + offs, mask=mask, other=0)
    in_output = c > 0
    seen = ((f & PROMPT_BIT) != 0) | in_output
    r = tl.where(seen, rep, 1.0)
    x = tl.where(x > 0, tl.math.div_rn(x, r), x * r)
    x -= freq * c
    x -= pres * in_output.to(tl.float32)
    tl.store(logits_ptr + row * stride_logits + offs, x, mask=mask)


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    flags: torch.Tensor,
    rows: torch.Tensor,
    vocab_rows: torch.Tensor,
    repetition_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    prompt_bit: int = 1,
) -> None:
    """In place on logits float32 [S, V]: for each i, sample row rows[i] takes the penalties of
    its parameters (indexed by the sample row, float32 [S]) against the output-token counts
    counts[vocab_rows[i]] (int32 [R, V]) and the prompt bit of flags[vocab_rows[i]] (uint8 [R, V])."""
    require(logits.dim() == 2 and logits.dtype == torch.float32, "logits", "must be float32 [S, V]")
    s, v = logits.shape
    for name, t, dtype in (("counts", counts, torch.int32), ("flags", flags, torch.uint8)):
        require(
            t.dim() == 2 and t.shape[1] == v and t.dtype == dtype,
            name,
            f"must be {dtype} [R, V={v}], got {t.dtype} {tuple(t.shape)}",
        )
    for name, t in (("logits", logits), ("counts", counts), ("flags", flags)):
        require(t.stride(-1) == 1, name, "last dimension must be contiguous")
    require(counts.shape[0] == flags.shape[0], "flags", "must have as many rows as counts")
    for name, t in (("rows", rows), ("vocab_rows", vocab_rows)):
        require_int_dtype(t, name)
    require(rows.shape == vocab_rows.shape and rows.dim() == 1, "vocab_rows", "must be [P] like rows")
    for name, t in (
        ("repetition_penalty", repetition_penalty),
        ("frequency_penalty", frequency_penalty),
        ("presence_penalty", presence_penalty),
    ):
        require(t.dtype == torch.float32 and t.shape == (s,), name, f"must be float32 [S={s}]")
    require_cuda_or_interpret(logits, "logits")
    p = rows.shape[0]
    if p == 0 or v == 0:
        return
    block = min(2048, triton.next_power_of_2(v))
    _apply_penalties_kernel[(p, triton.cdiv(v, block))](
        logits,
        counts,
        flags,
        rows,
        vocab_rows,
        repetition_penalty,
        frequency_penalty,
        presence_penalty,
        v,
        logits.stride(0),
        counts.stride(0),
        flags.stride(0),
        PROMPT_BIT=prompt_bit,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
