"""Triton kernels against their torch references (kernels/reference.py).

CPU: each check runs in a child Python with TRITON_INTERPRET=1 (it must be set before triton is
first imported, so it cannot be flipped inside this pytest process without breaking other
tests) at small sizes. GPU (@pytest.mark.gpu): the same checks at real sizes, in process.

Every check draws fresh random inputs, poisons outputs with NaN first, and uses paged caches
whose blocks are a random permutation (unused table entries point at random live blocks, so
an over-read changes the answer).

Run one CPU group by hand: TRITON_INTERPRET=1 python tests/test_kernels.py decode
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
import fastserve.kernels as K  # noqa: E402
from fastserve.kernels import reference as R  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert not torch.isnan(out).any(), f"{what}: NaN in output (an element was never written)"
    tol = TOL[dtype]
    rel = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    assert rel < tol, f"{what}: relative error {rel:.2e} >= {tol:.0e}"
    torch.testing.assert_close(out.float(), ref.float(), atol=5 * tol, rtol=5 * tol, msg=what)


def make_paged_cache(
    lens: list[int], hkv: int, d: int, block_size: int, dtype, device, spare_blocks: int = 3, kv_dtype=None
):
    """A random cache (kv_dtype: an FP8 cache's dtype) and block tables whose blocks are
    shuffled across the pool."""
    blocks_per_seq = [max(1, math.ceil(n / block_size)) for n in lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    kv_cache = torch.randn(2, num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    if kv_dtype is not None:
        kv_cache = R.to_cache_dtype(kv_cache * 3, kv_dtype)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = torch.randint(0, num_blocks, (len(lens), max_blocks), dtype=torch.int32, device=device)
    at = 0
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = perm[at : at + nb]
        at += nb
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return kv_cache, tables, seq_lens


# ---------------------------------------------------------------- checks (shared CPU / GPU)


def check_decode(device, dtype, batch_lens, hq, hkv, d, block_size, num_splits=None, kv_dtype=None):
    kv_cache, tables, seq_lens = make_paged_cache(batch_lens, hkv, d, block_size, dtype, device, kv_dtype=kv_dtype)
    q = torch.randn(len(batch_lens), hq, d, dtype=dtype, device=device)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    K.paged_decode_attention(q, kv_cache, tables, seq_lens, scale, out=out, num_splits=num_splits)
    ref = R.paged_decode_attention(q, kv_cache, tables, seq_lens, scale)
    assert_close(out, ref, dtype, f"decode lens={batch_lens[:4]} hq={hq} hkv={hkv} d={d} splits={num_splits}")


def check_prefill(device, dtype, ctx_q, hq, hkv, d, block_size, config=None, kv_dtype=None):
    """ctx_q: (cached context, new query tokens) per sequence."""
    lens = [c + n for c, n in ctx_q]
    kv_cache, tables, seq_lens = make_paged_cache(lens, hkv, d, block_size, dtype, device, kv_dtype=kv_dtype)
    q_lens = torch.tensor([n for _, n in ctx_q], dtype=torch.int32, device=device)
    qsl = torch.zeros(len(ctx_q) + 1, dtype=torch.int32, device=device)
    qsl[1:] = torch.cumsum(q_lens, 0)
    q = torch.randn(int(qsl[-1]), hq, d, dtype=dtype, device=device)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    K.paged_prefill_attention(q, kv_cache, qsl, seq_lens, tables, int(q_lens.max()), scale, out=out, config=config)
    ref = R.paged_prefill_attention(q, kv_cache, qsl, seq_lens, tables, scale)
    assert_close(out, ref, dtype, f"prefill ctx_q={ctx_q[:4]} hq={hq} hkv={hkv} d={d}")


def check_write_kv_cache(device, dtype, num_tokens, hkv, d, block_size, num_blocks, kv_dtype=None):
    cache = torch.randn(2, num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    if kv_dtype is not None:
        cache = R.to_cache_dtype(cache, kv_dtype)
    expected = cache.clone()
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[torch.rand(num_tokens, device=device) < 0.2] = -1  # padded tokens
    k = torch.randn(num_tokens, hkv, d, dtype=dtype, device=device)
    v = torch.randn(num_tokens, hkv, d, dtype=dtype, device=device)
    if kv_dtype is not None:
        if device == "cpu":
            # Triton's interpreter rounds to FP8 without the carry into the next binade (31.9
            # -> 16, not 32): on the CPU the values are on the FP8 grid already and only the
            # indexing and the saturation are checked; the GPU run checks the rounding too.
            k, v = (R.to_cache_dtype(t * 8, kv_dtype).to(dtype) for t in (k, v))
        # Values past FP8's range (e4m3 448, e5m2 57344) must saturate, not become NaN / inf.
        big = torch.rand(num_tokens, hkv, d, device=device) < 0.1
        k[big], v[big] = 6e4, -6e4
    K.write_kv_cache(k, v, cache, slots)
    R.write_kv_cache(k, v, expected, slots)
    if kv_dtype is not None:
        assert torch.isfinite(cache.float()).all(), "an FP8 cache must saturate"
        cache, expected = cache.view(torch.uint8), expected.view(torch.uint8)  # fp8 has no equal on CPU
    assert torch.equal(cache, expected), "write_kv_cache differs from the reference scatter"


def check_rms_norm(device, dtype, rows, hidden):
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    out = torch.full_like(x, float("nan"))
    K.rms_norm(x, w, 1e-6, out=out)
    assert_close(out, R.rms_norm(x, w, 1e-6), dtype, f"rms_norm {rows}x{hidden}")

    residual = torch.randn(rows, hidden, dtype=dtype, device=device)
    ref_out, ref_res = R.fused_add_rms_norm(x, residual, w, 1e-6)
    x2, r2 = x.clone(), residual.clone()
    got_x, got_r = K.fused_add_rms_norm(x2, r2, w, 1e-6)
    assert got_x.data_ptr() == x2.data_ptr() and got_r.data_ptr() == r2.data_ptr(), "must be in place"
    assert torch.equal(r2, ref_res), "fused_add_rms_norm residual is not x + residual"
    assert_close(x2, ref_out, dtype, f"fused_add_rms_norm {rows}x{hidden}")


def check_rotary(device, dtype, num_tokens, hq, hkv, d, rot, is_neox, flat):
    max_pos = 4096
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
    freqs = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)
    positions = torch.randint(0, max_pos, (num_tokens,), device=device)
    q = torch.randn(num_tokens, hq, d, dtype=dtype, device=device)
    k = torch.randn(num_tokens, hkv, d, dtype=dtype, device=device)
    ref_q = R.rotary_embedding(positions, q, cache, is_neox)
    ref_k = R.rotary_embedding(positions, k, cache, is_neox)
    if flat:
        q2, k2 = q.reshape(num_tokens, -1).clone(), k.reshape(num_tokens, -1).clone()
        K.rotary_embedding(positions, q2, k2, cache, is_neox, head_size=d)
        q2, k2 = q2.view_as(q), k2.view_as(k)
    else:
        q2, k2 = q.clone(), k.clone()
        K.rotary_embedding(positions, q2, k2, cache, is_neox)
    what = f"rotary neox={is_neox} rot={rot}/{d}"
    assert_close(q2, ref_q, dtype, what + " q")
    assert_close(k2, ref_k, dtype, what + " k")


def check_silu_and_mul(device, dtype, shape, inter):
    x = torch.randn(*shape, 2 * inter, dtype=dtype, device=device)
    out = torch.full((*shape, inter), float("nan"), dtype=dtype, device=device)
    K.silu_and_mul(x, out=out)
    assert_close(out, R.silu_and_mul(x), dtype, f"silu_and_mul {shape} I={inter}")


def check_penalties(device, samples, pool_rows, vocab, penalized):
    """Bit-identical to the torch definition: logits of both signs, counts of zero and more,
    prompt bits alone and with counts, unpenalized rows untouched, pool rows out of order."""
    g = torch.Generator(device="cpu").manual_seed(vocab)
    logits = (torch.randn(samples, vocab, generator=g) * 4).to(device)
    counts = torch.randint(0, 4, (pool_rows, vocab), generator=g, dtype=torch.int32)
    counts *= torch.rand(pool_rows, vocab, generator=g) < 0.3  # most tokens not yet output
    flags = torch.randint(0, 16, (pool_rows, vocab), generator=g, dtype=torch.uint8)  # every bit in use
    rows = torch.randperm(samples, generator=g)[:penalized]
    vocab_rows = torch.randperm(pool_rows, generator=g)[:penalized].to(torch.int32)
    rep = torch.rand(samples, generator=g) * 1.5 + 0.5
    freq = torch.randn(samples, generator=g)
    pres = torch.randn(samples, generator=g)
    args = [t.to(device) for t in (counts, flags, rows, vocab_rows, rep, freq, pres)]
    ref = logits.clone()
    R.apply_penalties(ref, *args, 1)
    out = logits.clone()
    K.apply_penalties(out, *args, 1)
    assert torch.equal(out, ref), f"penalties: {(out != ref).sum().item()} elements differ"
    untouched = torch.ones(samples, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(out[untouched.to(device)], logits[untouched.to(device)])


# ---------------------------------------------------------------- CPU cases (interpreted)

F32, F16 = torch.float32, torch.float16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
CPU_CASES = {
    "decode": [
        (check_decode, dict(dtype=F32, batch_lens=[1, 17, 40], hq=2, hkv=2, d=32, block_size=8)),
        (check_decode, dict(dtype=F16, batch_lens=[33, 5], hq=8, hkv=2, d=64, block_size=16)),
        (
            check_decode,
            dict(dtype=F32, batch_lens=[70, 3, 0], hq=8, hkv=1, d=32, block_size=16, num_splits=3),
        ),  # MQA, GQA 8, splits past short sequences, empty slot
        (
            check_decode,
            dict(dtype=F32, batch_lens=[50, 9], hq=4, hkv=1, d=80, block_size=8, num_splits=2),
        ),  # head_dim padded 80 -> 128
    ],
    "prefill": [
        (check_prefill, dict(dtype=F32, ctx_q=[(0, 37), (20, 5), (50, 1), (7, 33)], hq=2, hkv=2, d=32, block_size=16)),
        (check_prefill, dict(dtype=F16, ctx_q=[(0, 40), (13, 19)], hq=8, hkv=2, d=64, block_size=8)),
        (check_prefill, dict(dtype=F32, ctx_q=[(40, 24), (0, 3)], hq=8, hkv=1, d=32, block_size=16)),
        (check_prefill, dict(dtype=F32, ctx_q=[(9, 20)], hq=2, hkv=1, d=80, block_size=8)),
        (
            check_prefill,
            dict(dtype=F32, ctx_q=[(30, 21), (0, 40), (5, 1)], hq=8, hkv=2, d=32, block_size=8, config=dict(PACK=2)),
        ),  # two heads per program
        (
            check_prefill,
            dict(dtype=F32, ctx_q=[(17, 9), (0, 22)], hq=4, hkv=1, d=32, block_size=16, config=dict(PACK=4)),
        ),
        (
            check_prefill,
            dict(
                dtype=F32,
                ctx_q=[(40, 1), (9, 3), (0, 4)],
                hq=8,
                hkv=2,
                d=32,
                block_size=8,
                config=dict(BLOCK_M=16, PACK=4),
            ),
        ),  # decode-like tiles
    ],
    "cache": [
        (check_write_kv_cache, dict(dtype=F32, num_tokens=20, hkv=2, d=32, block_size=8, num_blocks=6)),
        (check_write_kv_cache, dict(dtype=F16, num_tokens=7, hkv=3, d=80, block_size=16, num_blocks=2)),
        (check_write_kv_cache, dict(dtype=F32, num_tokens=20, hkv=2, d=32, block_size=8, num_blocks=6, kv_dtype=E4M3)),
        (check_write_kv_cache, dict(dtype=F16, num_tokens=9, hkv=1, d=64, block_size=4, num_blocks=5, kv_dtype=E5M2)),
    ],
    "fp8_kv": [  # kv_cache_dtype="fp8": the kernels widen the cache to q's dtype
        (check_decode, dict(dtype=F32, batch_lens=[1, 17, 40], hq=4, hkv=2, d=32, block_size=8, kv_dtype=E4M3)),
        (
            check_decode,
            dict(dtype=F16, batch_lens=[33, 5], hq=8, hkv=2, d=64, block_size=16, num_splits=2, kv_dtype=E5M2),
        ),
        (
            check_prefill,
            dict(dtype=F32, ctx_q=[(0, 37), (20, 5), (7, 33)], hq=2, hkv=1, d=32, block_size=16, kv_dtype=E4M3),
        ),
        (check_prefill, dict(dtype=F16, ctx_q=[(0, 20), (13, 19)], hq=4, hkv=2, d=64, block_size=8, kv_dtype=E4M3)),
    ],
    "norm": [
        (check_rms_norm, dict(dtype=F32, rows=5, hidden=96)),
        (check_rms_norm, dict(dtype=F16, rows=3, hidden=256)),
    ],
    "rotary": [
        (check_rotary, dict(dtype=F32, num_tokens=6, hq=4, hkv=2, d=32, rot=32, is_neox=True, flat=False)),
        (check_rotary, dict(dtype=F32, num_tokens=6, hq=4, hkv=1, d=32, rot=32, is_neox=False, flat=True)),
        (check_rotary, dict(dtype=F16, num_tokens=5, hq=3, hkv=3, d=64, rot=16, is_neox=True, flat=False)),
        (check_rotary, dict(dtype=F32, num_tokens=4, hq=2, hkv=2, d=64, rot=16, is_neox=False, flat=False)),
        # GPT-NeoX (Pythia-2.8B) heads: 80 wide, 20 rotated (a half of 10 is not a power of two)
        (check_rotary, dict(dtype=F32, num_tokens=5, hq=2, hkv=2, d=80, rot=20, is_neox=True, flat=False)),
    ],
    "penalties": [
        (check_penalties, dict(samples=5, pool_rows=7, vocab=300, penalized=3)),  # a partial vocab block
        (check_penalties, dict(samples=3, pool_rows=3, vocab=4100, penalized=3)),  # three blocks of 2048
    ],
    "activation": [
        (check_silu_and_mul, dict(dtype=F32, shape=(7,), inter=96)),
        (check_silu_and_mul, dict(dtype=F16, shape=(2, 3), inter=40)),
    ],
}


def _run_cpu_group(group: str) -> None:
    torch.manual_seed(0)
    for fn, kwargs in CPU_CASES[group]:
        fn("cpu", **kwargs)
        print(f"ok {fn.__name__} {kwargs}", flush=True)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("group", sorted(CPU_CASES))
def test_interpreted(group):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__, group], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=580
    )
    assert proc.returncode == 0, f"{group} failed under TRITON_INTERPRET=1:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.count("ok ") == len(CPU_CASES[group]), proc.stdout


# ---------------------------------------------------------------- argument errors (no launch)


def test_errors_name_the_argument():
    q = torch.randn(2, 8, 64)
    cache = torch.randn(2, 4, 16, 2, 64)
    tables = torch.zeros(2, 4, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens"):
        K.paged_decode_attention(q, cache, tables, lens.long(), 0.1)
    with pytest.raises(ValueError, match="q: num_heads"):
        K.paged_decode_attention(torch.randn(2, 7, 64), cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="query_start_loc"):
        K.paged_prefill_attention(q, cache, lens, lens, tables, 1, 0.1)
    with pytest.raises(ValueError, match="slot_mapping"):
        K.write_kv_cache(torch.randn(3, 2, 64), torch.randn(3, 2, 64), cache, torch.zeros(3))
    with pytest.raises(ValueError, match="weight"):
        K.rms_norm(torch.randn(2, 8), torch.randn(4), 1e-6)
    with pytest.raises(ValueError, match="x"):
        K.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="head_size"):
        K.rotary_embedding(torch.zeros(2, dtype=torch.long), torch.randn(2, 64), None, torch.randn(10, 32), True)
    with pytest.raises(ValueError, match="x: must be a CUDA tensor"):
        K.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6)


# ---------------------------------------------------------------- GPU, real sizes

BF16 = torch.bfloat16


def _rand_lens(n, lo, hi):
    return torch.randint(lo, hi, (n,)).tolist()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8), (32, 4), (16, 1)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_decode_gpu(hq, hkv, d, dtype):
    lens = _rand_lens(12, 1, 5000)
    check_decode("cuda", dtype, lens, hq, hkv, d, block_size=16)
    check_decode("cuda", dtype, lens, hq, hkv, d, block_size=16, num_splits=1)
    check_decode("cuda", dtype, [1, 700, 9000], hq, hkv, d, block_size=32, num_splits=7)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [80, 96, 256])
def test_decode_gpu_padded_head_dims(d):
    check_decode("cuda", BF16, _rand_lens(6, 1, 3000), 16, 4, d, block_size=16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kv_dtype", [E4M3, E5M2])
def test_fp8_kv_cache_gpu(kv_dtype):
    check_write_kv_cache("cuda", BF16, 300, 8, 128, 16, 64, kv_dtype=kv_dtype)
    check_decode("cuda", BF16, _rand_lens(12, 1, 5000), 32, 8, 128, block_size=16, kv_dtype=kv_dtype)
    check_prefill("cuda", BF16, [(0, 1024), (777, 129), (1500, 1)], 32, 8, 128, block_size=16, kv_dtype=kv_dtype)


@pytest.mark.gpu
@gpu
def test_penalties_gpu():
    check_penalties("cuda", samples=300, pool_rows=320, vocab=128256, penalized=256)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8), (32, 4), (16, 1)])
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_gpu(hq, hkv, d):
    # Whole prompts, chunked prefill (query shorter than context), prefix hits, decodes.
    ctx_q = [(0, 1024), (0, 300), (777, 129), (2048, 512), (1500, 1), (63, 64), (0, 1)]
    check_prefill("cuda", BF16, ctx_q, hq, hkv, d, block_size=16)
    check_prefill("cuda", F16, [(100, 1000), (0, 17)], hq, hkv, d, block_size=32)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "config",
    [
        None,
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, PACK=2),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, PACK=4),
    ],
)
def test_prefill_gpu_long_queries_and_tile_configs(config):
    # Past 2048 query tokens the default switches tile shape; also pin each swept shape.
    check_prefill("cuda", BF16, [(0, 2600), (1000, 2100), (3000, 1), (5, 70)], 32, 8, 128, block_size=16, config=config)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8), (12, 4), (16, 1)])
def test_prefill_gpu_short_queries(hq, hkv):
    # max_query_len <= 16 switches to head-packed small tiles (decodes, speculative verify).
    check_prefill("cuda", BF16, [(1000, 1), (50, 3), (4000, 16), (0, 7), (333, 1)], hq, hkv, 128, block_size=16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [80, 96, 256])
def test_prefill_gpu_padded_head_dims(d):
    check_prefill("cuda", BF16, [(0, 400), (300, 77), (20, 1)], 8, 2, d, block_size=16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [80, 128, 256])
def test_attention_gpu_float32(d):
    # A float32 model (the GPU parity tests, dtype="float32") doubles every tile the bf16
    # defaults were swept for: the wrappers must shrink them to fit shared memory.
    check_decode("cuda", F32, _rand_lens(6, 1, 3000), 16, 4, d, block_size=16)
    check_prefill("cuda", F32, [(0, 400), (300, 77), (20, 1)], 8, 2, d, block_size=16)
    check_prefill("cuda", F32, [(1000, 1), (50, 3), (0, 7)], 8, 2, d, block_size=16)


def test_tile_fit_keeps_swept_bf16_shapes_and_shrinks_float32():
    from fastserve.kernels import attention_decode as AD
    from fastserve.kernels import attention_prefill as AP
    from fastserve.kernels._tiles import _HEADROOM, fit_shared_memory, tile_bytes

    cuda = torch.device("cuda")
    h200 = 232448  # the opt-in shared memory per block Triton reported on H200
    for d_pad in (64, 128):
        cfg = AP._default_config(d_pad, cuda, 2048, 4)
        assert fit_shared_memory(cfg, d_pad, 2, h200) == cfg, "bf16 prefill tiles are the swept ones"
        cfg = AD._default_config(d_pad, cuda)
        assert fit_shared_memory(cfg, d_pad, 2, h200, rows_m=16) == cfg, "bf16 decode tiles are the swept ones"
    for d_pad in (128, 256):
        for max_q, group in ((2048, 4), (1, 8), (16, 4)):
            cfg = AP._default_config(d_pad, cuda, max_q, group)
            fit = fit_shared_memory(cfg, d_pad, 4, h200, min_rows_m=max(16, cfg.get("PACK", 1)))
            assert tile_bytes(fit, fit["BLOCK_M"], d_pad, 4) <= h200 * _HEADROOM, (d_pad, max_q, fit)
            assert fit["BLOCK_M"] % fit.get("PACK", 1) == 0
        fit = fit_shared_memory(AD._default_config(d_pad, cuda), d_pad, 4, h200, rows_m=16)
        assert tile_bytes(fit, 16, d_pad, 4) <= h200 * _HEADROOM, (d_pad, fit)
    # head_dim 80 pads to 128: the case that failed on H200 (262144 > 232448) now fits.
    cfg = AP._default_config(128, cuda, 2048, 4)
    assert tile_bytes(cfg, cfg["BLOCK_M"], 128, 4) > h200 * _HEADROOM
    assert fit_shared_memory(cfg, 128, 4, h200) != cfg


@pytest.mark.gpu
@gpu
def test_small_kernels_gpu():
    for dtype in (BF16, F16, F32):
        check_write_kv_cache("cuda", dtype, 3000, 8, 128, 16, 400)
        check_rms_norm("cuda", dtype, 1000, 4096)
        check_rotary("cuda", dtype, 2000, 32, 8, 128, 128, True, False)
        check_rotary("cuda", dtype, 2000, 16, 16, 64, 32, False, True)
        check_rotary("cuda", dtype, 2000, 32, 32, 80, 20, True, False)
        check_silu_and_mul("cuda", dtype, (1000,), 14336)


if __name__ == "__main__":
    _run_cpu_group(sys.argv[1])
