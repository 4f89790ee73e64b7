"""Paged attention over the KV cache.

KV cache layout (one tensor per layer): [2, num_blocks, block_size, num_kv_heads, head_dim],
index 0 = K, 1 = V; token slot = block_id * block_size + offset. A slot of -1
(`PAD_SLOT_ID`, vLLM's convention) marks a padding token whose K/V is not written.

Tokens arrive flat, sequence after sequence (decodes first), as in `fastserve._core.Batch`.
Query token i of a sequence with query length q and context length s sits at position
s - q + i and sees the keys at positions <= its own: cached context and new tokens alike,
so one code path serves prefill, chunked prefill over a cached prefix, and decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAD_SLOT_ID = -1


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, PAD_SLOT_ID for padding tokens
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, context (cached + new) length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0 past each table
    num_decodes: int  # rows 0..num_decodes have query length 1
    max_query_len: int
    max_seq_len: int


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V [T, Hkv, D] into their cache slots."""
    if kv_cache.is_cuda:
        # The kernel skips PAD_SLOT_ID on the device: no host sync, so CUDA graphs can hold it.
        from fastserve.kernels.cache import write_kv_cache as write_kernel

        write_kernel(k, v, kv_cache, slot_mapping)
        return
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_flat.index_copy_(0, slots, k[valid].to(kv_cache.dtype))
    v_flat.index_copy_(0, slots, v[valid].to(kv_cache.dtype))


def paged_attention_torch(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Reference paged attention, vectorized over sequences: gather each sequence's K/V via
    its block table into [B, max_seq_len, Hkv, D], pad queries to [B, max_query_len, Hq, D],
    one masked SDPA. Returns [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_seqs = meta.seq_lens.shape[0]
    device = q.device
    max_q, max_s = meta.max_query_len, meta.max_seq_len

    qsl = meta.query_start_loc.to(torch.int64)
    query_lens = qsl[1:] - qsl[:-1]
    seq_lens = meta.seq_lens.to(torch.int64)
    token_seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens, output_size=num_tokens)
    token_local = torch.arange(num_tokens, device=device) - qsl[token_seq]

    q_pad = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
    q_pad[token_seq, token_local] = q

    num_blocks = -(-max_s // block_size)
    tables = meta.block_tables[:, :num_blocks].to(torch.int64)
    k = kv_cache[0][tables].reshape(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)[:, :max_s]
    v = kv_cache[1][tables].reshape(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)[:, :max_s]
    key_pos = torch.arange(max_s, device=device)
    # Slots past a sequence's length hold other sequences' data or never-written memory
    # (possibly NaN); zero them, since a masked NaN still poisons P @ V (0 * NaN).
    key_valid = (key_pos.unsqueeze(0) < seq_lens.unsqueeze(1)).view(num_seqs, max_s, 1, 1)
    k = torch.where(key_valid, k, 0).to(q.dtype)
    v = torch.where(key_valid, v, 0).to(q.dtype)

    # Padded query rows get positions >= seq_len, so they still see key 0 and never make an
    # all-masked (NaN) softmax row; their outputs are dropped below.
    q_pos = (seq_lens - query_lens).unsqueeze(1) + torch.arange(max_q, device=device).unsqueeze(0)
    mask = key_pos.view(1, 1, max_s) <= q_pos.unsqueeze(-1)  # [B, max_q, max_s]

    group = num_heads // num_kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.unsqueeze(1), scale=scale
    )  # [B, Hq, max_q, D]
    return out.transpose(1, 2)[token_seq, token_local]


class Attention(nn.Module):
    """forward(q[T, Hq, D], k[T, Hkv, D], v[T, Hkv, D], kv_cache, meta) -> [T, Hq * D]."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        if q.is_cuda:
            out = self._forward_kernels(q, kv_cache, meta)
        else:
            out = paged_attention_torch(q, kv_cache, meta, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _forward_kernels(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        from fastserve.kernels.attention_decode import paged_decode_attention
        from fastserve.kernels.attention_prefill import paged_prefill_attention

        # Decode rows come first, one token each: the split-K decode kernel serves them (a
        # decode inside the prefill kernel would waste a whole query tile), the prefill
        # kernel the rest. Both read the K/V written above.
        out = torch.empty_like(q)
        d = meta.num_decodes
        if d:
            paged_decode_attention(
                q[:d],
                kv_cache,
                meta.block_tables[:d],
                meta.seq_lens[:d],
                self.scale,
                out=out[:d],
                max_seq_len=meta.max_seq_len,
            )
        if q.shape[0] > d:
            paged_prefill_attention(
                q[d:],
                kv_cache,
                meta.query_start_loc[d:] - d,
                meta.seq_lens[d:],
                meta.block_tables[d:],
                meta.max_query_len,
                self.scale,
                out=out[d:],
            )
        return out
