"""Plain-torch definitions of every kernel in this package.

They are the specification the Triton kernels are tested against, and they run anywhere torch
does (no Triton), computing in float32 and casting back to the input dtype. Attention here
gathers the paged cache into a padded contiguous copy, so it is fine for tests and tiny CPU
runs but costs a full copy of the context per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it: an FP8 cache saturates at its largest finite value (torch's
    plain cast turns e4m3 overflow into NaN and e5m2 overflow into inf), as the CUDA
    conversion vLLM's cache kernels use does."""
    if dtype in FP8_DTYPES:
        top = torch.finfo(dtype).max
        return x.clamp(-top, top).to(dtype)
    return x.to(dtype)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter k/v [T, Hkv, D] into kv_cache [2, num_blocks, block_size, Hkv, D]; slot -1 is skipped."""
    _, num_blocks, block_size, hkv, d = kv_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat = kv_cache.view(2, num_blocks * block_size, hkv, d)
    flat[0, slots] = to_cache_dtype(k[keep], kv_cache.dtype)
    flat[1, slots] = to_cache_dtype(v[keep], kv_cache.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # Cast before the weight multiply, as HF Llama and vLLM do, so rounding matches them.
    return (xf * rstd).to(x.dtype) * weight


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place reference: returns (rms_norm(x + residual) * weight, x + residual)."""
    new_residual = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def rotary_embedding(
    positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool
) -> torch.Tensor:
    """Rotate the first rot_dim features of x [T, H, D]; cache rows are [cos(rot/2) | sin(rot/2)]."""
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, rot/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.float()
    xr, xpass = xf[..., :rot], xf[..., rot:]
    if is_neox:
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, xpass], dim=-1).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous K, V [B, max_len, Hkv, D] read through the block tables (positions past a
    sequence's length hold whatever its table points at; callers mask them)."""
    block_size = kv_cache.shape[2]
    pos = torch.arange(max_len, device=kv_cache.device)
    blocks = block_tables[:, pos // block_size].long()  # [B, L]
    offs = (pos % block_size).expand_as(blocks)
    return kv_cache[0][blocks, offs], kv_cache[1][blocks, offs]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, M, D], k/v [B, Hkv, L, D], mask [B, 1, M, L] (True = attend); float32 math."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhmd,bhld->bhml", q.float(), k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no keys give 0
    return torch.einsum("bhml,bhld->bhmd", probs, v)


def paged_decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Hq, D], one new token per sequence that sees all seq_lens[b] cached tokens."""
    max_len = int(seq_lens.max())
    k, v = gather_kv(kv_cache, block_tables, max_len)
    mask = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None].long()
    out = _attend(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), mask[:, None, None, :], scale)
    return out[:, :, 0, :].to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D] packed by query_start_loc; query i of sequence b sits at position
    seq_lens[b] - query_len[b] + i and sees cached keys at positions <= its own."""
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    num_seqs = q_lens.numel()
    max_q, max_len = int(q_lens.max()), int(seq_lens.max())
    seq_of_tok = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), q_lens)
    row = torch.arange(q.shape[0], device=q.device) - qsl[seq_of_tok]
    qp = q.new_zeros(num_seqs, max_q, *q.shape[1:])
    qp[seq_of_tok, row] = q
    k, v = gather_kv(kv_cache, block_tables, max_len)
    q_pos = (seq_lens.long() - q_lens)[:, None] + torch.arange(max_q, device=q.device)[None, :]
    key_pos = torch.arange(max_len, device=q.device)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # causal; implies key < seq_len
    out = _attend(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask[:, None], scale)
    return out.transpose(1, 2)[seq_of_tok, row].to(q.dtype)


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
    """In place: repetition penalty on tokens of the prompt or the output so far (divide a
    positive logit, multiply a negative one), then frequency (x output count) and presence
    (output count > 0) subtracted."""
    c = counts.index_select(0, vocab_rows).to(torch.float32)
    in_output = c > 0
    seen = (flags.index_select(0, vocab_rows) & prompt_bit) != 0
    seen |= in_output
    sub = logits.index_select(0, rows)
    rep = torch.where(seen, repetition_penalty.index_select(0, rows)[:, None].expand_as(sub), 1.0)
    sub = torch.where(sub > 0, sub / rep, sub * rep)
    sub -= frequency_penalty.index_select(0, rows)[:, None] * c
    sub -= presence_penalty.index_select(0, rows)[:, None] * in_output
    logits.index_copy_(0, rows, sub)
