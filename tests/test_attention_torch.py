"""The CPU attention path (layers/attention.py: one TorchPlan per step, query heads folded into
rows per KV group) against a per-sequence loop written from the definition, on NaN-poisoned
caches: decodes and prompt chunks over cached context; padding slots are not written."""

from __future__ import annotations

import math

import pytest
import torch
from fastserve.layers.attention import PAD_SLOT_ID, Attention, AttentionMetadata, write_kv_cache


def naive(q, k_ctx, v_ctx, scale):
    """q [Q, H, D] at the last Q positions of k_ctx/v_ctx [S, Hkv, D]; causal."""
    qn, h, _ = q.shape
    s, hkv, _ = k_ctx.shape
    g = h // hkv
    out = torch.empty_like(q)
    for i in range(qn):
        pos = s - qn + i
        for head in range(h):
            kk, vv = k_ctx[: pos + 1, head // g], v_ctx[: pos + 1, head // g]
            w = torch.softmax((kk @ q[i, head]) * scale, dim=0)
            out[i, head] = w @ vv
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("shape", ["decodes", "mixed", "prefills"])
def test_torch_paged_attention_matches_the_definition(hq, hkv, shape):
    torch.manual_seed(hq * 10 + hkv)
    d, bs = 16, 4
    # (cached context, new tokens) per sequence; decodes first, as batches order them
    seqs = {
        "decodes": [(5, 1), (11, 1), (0, 1)],
        # decodes of different lengths, then chunks (one of a single token), as a serving step
        "mixed": [(7, 1), (2, 1), (18, 1), (0, 9), (6, 3), (4, 1), (13, 5)],
        "prefills": [(0, 9), (6, 3), (13, 5)],
    }[shape]
    num_blocks = sum(math.ceil((c + n) / bs) for c, n in seqs) + 3
    cache = torch.full((2, num_blocks, bs, hkv, d), float("nan"))
    perm = torch.randperm(num_blocks).tolist()
    width = max(math.ceil((c + n) / bs) for c, n in seqs) + 1
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    ctx_k, ctx_v, at = [], [], 0
    for i, (c, n) in enumerate(seqs):
        nb = math.ceil((c + n) / bs)
        tables[i, :nb] = torch.tensor(perm[at : at + nb])
        at += nb
        k_all, v_all = torch.randn(c + n, hkv, d), torch.randn(c + n, hkv, d)
        ctx_k.append(k_all)
        ctx_v.append(v_all)
        for p in range(c):  # the cached context is already in its slots
            blk, off = tables[i, p // bs].item(), p % bs
            cache[0, blk, off], cache[1, blk, off] = k_all[p], v_all[p]
    slot, qs, ks, vs, qsl = [], [], [], [], [0]
    for i, (c, n) in enumerate(seqs):
        for p in range(c, c + n):
            slot.append(tables[i, p // bs].item() * bs + p % bs)
        qs.append(torch.randn(n, hq, d))
        ks.append(ctx_k[i][c:])
        vs.append(ctx_v[i][c:])
        qsl.append(qsl[-1] + n)
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slot, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n in seqs], dtype=torch.int32),
        block_tables=tables,
        num_decodes=next((i for i, (_, n) in enumerate(seqs) if n != 1), len(seqs)),
        max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(seqs))),
        max_seq_len=max(c + n for c, n in seqs),
    )
    scale = d**-0.5
    attn = Attention(hq, d, scale, hkv)
    out = attn(q, k, v, cache, meta).view(-1, hq, d)
    out2 = attn(q, k, v, cache, meta).view(-1, hq, d)  # the step's plan, reused by a second layer
    assert meta.torch_plan is not None
    torch.testing.assert_close(out2, out)
    for i, (c, n) in enumerate(seqs):
        got = out[qsl[i] : qsl[i] + n]
        want = naive(qs[i], ctx_k[i], ctx_v[i], scale)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_slots_are_not_written():
    cache = torch.zeros(2, 3, 4, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv_cache(k, v, cache, torch.tensor([5, PAD_SLOT_ID, 2]))
    flat = cache.view(2, -1, 2, 8)
    torch.testing.assert_close(flat[0, 5], k[0])
    torch.testing.assert_close(flat[1, 2], v[2])
    assert int((flat.abs().sum(dim=(-1, -2)) > 0).sum()) == 4, "only slots 5 and 2 of K and V are written"
