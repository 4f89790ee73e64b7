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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastserve.kernels.reference import to_cache_dtype

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
    # The torch (CPU) path's per-step indices, built by the first layer that needs them.
    torch_plan: TorchPlan | None = field(default=None, repr=False, compare=False)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, plan: TorchPlan | None = None
) -> None:
    """Scatter this step's K/V [T, Hkv, D] into their cache slots."""
    if kv_cache.is_cuda:
        # The kernel skips PAD_SLOT_ID on the device: no host sync, so CUDA graphs can hold it.
        from fastserve.kernels.cache import write_kv_cache as write_kernel

        write_kernel(k, v, kv_cache, slot_mapping)
        return
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
    if plan is None:
        plan = TorchPlan.of(slot_mapping)
    if plan.valid_tokens is not None:
        k, v = k[plan.valid_tokens], v[plan.valid_tokens]
    _bytes(k_flat).index_copy_(0, plan.write_slots, _bytes(to_cache_dtype(k, kv_cache.dtype)))
    _bytes(v_flat).index_copy_(0, plan.write_slots, _bytes(to_cache_dtype(v, kv_cache.dtype)))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as its bytes: torch's CPU index_copy_ / index_select have no FP8 kernels."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _gather(cache: torch.Tensor, flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = _bytes(cache).index_select(0, flat)
    return (rows.view(cache.dtype) if rows.dtype != cache.dtype else rows).to(dtype)


class TorchPlan:
    """The index work of the torch attention path, done once per step instead of once per layer:
    every layer of a step shares the batch's shape (30 layers of SmolLM2 rebuilt the same
    gathers, masks and padding indices 30 times). Built on the first layer, kept on the step's
    AttentionMetadata.

    The step's decodes and its prefill chunks are two groups, one SDPA each: padding every
    decode's single query to the longest chunk of the step (a 128-token prompt beside 63
    decodes) made the serving steps' attention 64x the work."""

    __slots__ = ("write_slots", "valid_tokens", "groups")

    @classmethod
    def of(cls, slot_mapping: torch.Tensor) -> TorchPlan:
        plan = cls.__new__(cls)
        plan._set_writes(slot_mapping)
        return plan

    def _set_writes(self, slot_mapping: torch.Tensor) -> None:
        valid = slot_mapping >= 0
        # The CPU path pads no token (no CUDA graphs), so the mask is usually all true: skip it.
        if bool(valid.all()):
            self.write_slots, self.valid_tokens = slot_mapping, None
        else:
            self.write_slots, self.valid_tokens = slot_mapping[valid], valid

    def __init__(self, meta: AttentionMetadata, block_size: int):
        self._set_writes(meta.slot_mapping)
        num_seqs, d = meta.seq_lens.shape[0], meta.num_decodes
        qsl = meta.query_start_loc.to(torch.int64)
        seq_lens = meta.seq_lens.to(torch.int64)
        tables = meta.block_tables.to(torch.int64)
        self.groups = []
        if d:
            self.groups.append(_SeqGroup(qsl[: d + 1], seq_lens[:d], tables[:d], block_size, decode=True))
        if num_seqs > d:
            self.groups.append(_SeqGroup(qsl[d:], seq_lens[d:], tables[d:], block_size, decode=False))


class _SeqGroup:
    """Consecutive sequences of a step attended by one SDPA: the K/V gather [B, max_s], the
    causal mask [B, max_q, max_s] and, for prefill chunks, where each token sits in the padded
    query block."""

    __slots__ = ("tokens", "num_seqs", "max_q", "max_s", "gather", "mask", "token_seq", "token_local")

    def __init__(self, qsl: torch.Tensor, seq_lens: torch.Tensor, tables: torch.Tensor, block_size: int, decode: bool):
        device = seq_lens.device
        first, last = int(qsl[0]), int(qsl[-1])
        self.tokens = slice(first, last)
        self.num_seqs = b = seq_lens.shape[0]
        query_lens = qsl[1:] - qsl[:-1]
        self.max_q = 1 if decode else int(query_lens.max())
        self.max_s = max_s = int(seq_lens.max())
        if decode:
            self.token_seq = self.token_local = None
        else:
            n = last - first
            self.token_seq = torch.repeat_interleave(torch.arange(b, device=device), query_lens, output_size=n)
            self.token_local = torch.arange(n, device=device) - (qsl[self.token_seq] - first)
        # Cache slot of each sequence's key positions. Positions past a sequence's length would
        # read other sequences' data or never-written memory (possibly NaN: a masked NaN still
        # poisons P @ V, since 0 * NaN is NaN), so they read the sequence's own position 0
        # instead: written, finite, and masked out.
        key_pos = torch.arange(max_s, device=device)
        key_valid = key_pos.unsqueeze(0) < seq_lens.unsqueeze(1)  # [B, max_s]
        pos = torch.where(key_valid, key_pos.unsqueeze(0), 0)
        self.gather = torch.gather(tables, 1, pos // block_size) * block_size + pos % block_size  # [B, max_s]
        # Padded query rows get positions >= seq_len, so they still see key 0 and never make an
        # all-masked (NaN) softmax row; their outputs are dropped.
        q_pos = (seq_lens - query_lens).unsqueeze(1) + torch.arange(self.max_q, device=device).unsqueeze(0)
        self.mask = key_pos.view(1, 1, max_s) <= q_pos.unsqueeze(-1)  # [B, max_q, max_s]


def paged_attention_torch(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, plan: TorchPlan | None = None
) -> torch.Tensor:
    """Reference paged attention, vectorized over sequences: per group (the step's decodes, its
    prefill chunks), gather each sequence's K/V via its block table into [B, max_s, Hkv, D],
    pad queries to [B, max_q, Hq, D], one masked SDPA. Returns [T, Hq, D]."""
    if plan is None:
        plan = TorchPlan(meta, kv_cache.shape[2])
    groups = plan.groups
    if len(groups) == 1 and groups[0].tokens.stop == q.shape[0]:
        return _attend_group(q, kv_cache, groups[0], scale)
    out = q.new_zeros(q.shape)  # rows past the last sequence (padding) stay zero
    for g in groups:  # at most two: decodes, then prefill chunks
        out[g.tokens] = _attend_group(q[g.tokens], kv_cache, g, scale)
    return out


def _attend_group(q: torch.Tensor, kv_cache: torch.Tensor, g: _SeqGroup, scale: float) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    b, max_q, max_s = g.num_seqs, g.max_q, g.max_s
    if g.token_seq is None:
        q_pad = q.view(b, 1, num_heads, head_dim)
    else:
        q_pad = q.new_zeros(b, max_q, num_heads, head_dim)
        q_pad[g.token_seq, g.token_local] = q
    flat = g.gather.view(-1)
    k = _gather(kv_cache[0].view(-1, num_kv_heads, head_dim), flat, q.dtype)
    v = _gather(kv_cache[1].view(-1, num_kv_heads, head_dim), flat, q.dtype)
    k = k.view(b, max_s, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, S, D]
    v = v.view(b, max_s, num_kv_heads, head_dim).transpose(1, 2)

    # The query heads of a KV group become extra query rows of one SDPA over that group's
    # keys: no repeated K/V, and longer matmuls (half the time of enable_gqa on CPU).
    group = num_heads // num_kv_heads
    qg = q_pad.view(b, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qg = qg.reshape(b, num_kv_heads, group * max_q, head_dim)
    mask = g.mask.unsqueeze(1)  # [B, 1, max_q, S]
    if group > 1 and max_q > 1:
        mask = mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, G * max_q, D]
    out = out.view(b, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(b, max_q, num_heads, head_dim)
    if g.token_seq is None:
        return out.view(num_tokens, num_heads, head_dim)
    return out[g.token_seq, g.token_local]


class Attention(nn.Module):
    """forward(q[T, Hq, D], k[T, Hkv, D], v[T, Hkv, D], kv_cache, meta) -> [T, Hq * D].

    `k_scale` / `v_scale` (an FP8 cache's per-layer scales, vLLM's semantics: the cache holds
    k / k_scale): folded into the softmax scale and the output, since attention is linear in
    each, so every kernel reads the cache unchanged."""

    k_scale: float = 1.0
    v_scale: float = 1.0

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
        scale = self.scale
        if self.k_scale != 1.0:
            k, scale = k / self.k_scale, scale * self.k_scale
        if self.v_scale != 1.0:
            v = v / self.v_scale
        if q.is_cuda:
            write_kv_cache(k, v, kv_cache, meta.slot_mapping)
            out = self._forward_kernels(q, kv_cache, meta, scale)
        else:
            if meta.torch_plan is None:
                meta.torch_plan = TorchPlan(meta, kv_cache.shape[2])
            write_kv_cache(k, v, kv_cache, meta.slot_mapping, meta.torch_plan)
            out = paged_attention_torch(q, kv_cache, meta, scale, meta.torch_plan)
        if self.v_scale != 1.0:
            out = out * self.v_scale
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _forward_kernels(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
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
                scale,
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
                scale,
                out=out[d:],
            )
        return out
