"""Quantized GEMM kernels (kernels/quant_gemm.py, quant_fp8.py) against float64 references
written here from the layout's definition (QUANT_CONTRACT.md), not from the module's code.

CPU, interpreted: each group runs in a child Python with TRITON_INTERPRET=1 (it must be set
before triton is first imported) at small sizes: odd M, N not a multiple of the block, K a
multiple of the group, groups -1/32/40/64/128, bits 4 and 8, perm on/off, fp16 and fp32 (bf16
tl.dot is wrong in the interpreter, triton-lang/triton#11584; bf16 runs on the GPU). FP8 works
in the interpreter (fp8 dots are computed in fp16 there), so the FP8 GEMMs are interpreted too;
only torch._scaled_mm and real sizes are GPU-only. The "dispatch" group also routes CPU
tensors through the CUDA dispatch (FASTSERVE_QUANT_INTERPRET_DISPATCH=1): thresholds,
act-order handling and the fallback when a variant fails to compile.
CPU, in process: the torch path every entry point takes on CPU tensors, argument errors, the
act-order contract, dispatch settings.
GPU (@pytest.mark.gpu): every path at the Llama-3-8B / Qwen2.5-32B layer sizes in bf16/fp16,
inside a CUDA graph, and the warm-up.

Outputs and split-K partials start as NaN, so an element no program wrote fails the check.
Run one interpreted group by hand: TRITON_INTERPRET=1 python tests/test_quant_kernels.py int_fused
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
from fastserve.kernels import quant_common as QC  # noqa: E402
from fastserve.kernels import quant_fp8 as QF  # noqa: E402
from fastserve.kernels import quant_gemm as QG  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FP8 = torch.float8_e4m3fn
TOL = {F32: 1e-4, F16: 3e-3, BF16: 2e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, tol: float | None = None) -> None:
    assert not torch.isnan(out).any(), f"{what}: NaN in output (an element was never written)"
    tol = tol or TOL[dtype]
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    assert rel < tol, f"{what}: relative error {rel:.2e} >= {tol:.0e}"
    worst = ((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
    assert worst < 10 * tol, f"{what}: worst element off by {worst:.2e} of max |ref| (>= {10 * tol:.0e})"


# ---------------------------------------------------------------- references (from the layout's definition)


def ref_unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] int64: (qweight[k // pack, n] >> (bits * (k % pack))) & (2**bits - 1)."""
    pack = 32 // bits
    k = torch.arange(qweight.shape[0] * pack, device=qweight.device)
    return (qweight[k // pack].long() >> (bits * (k % pack)).unsqueeze(1)) & ((1 << bits) - 1)


def ref_dequant(qweight, scales, zeros, group_size, bits) -> torch.Tensor:
    q = ref_unpack(qweight, bits)
    k = q.shape[0]
    g = torch.arange(k, device=q.device) // (k if group_size == -1 else group_size)
    return (q.double() - zeros.double()[g]) * scales.double()[g]


def ref_w_int(x, qweight, scales, zeros, group_size, bits, perm=None, bias=None) -> torch.Tensor:
    xx = x.double()
    if perm is not None:
        xx = xx[..., perm.long()]
    y = xx @ ref_dequant(qweight, scales, zeros, group_size, bits)
    return y + bias.double() if bias is not None else y


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] values in [0, 2**bits) -> int32 [K // pack, N], packed along K (the inverse of ref_unpack)."""
    pack = 32 // bits
    k, n = q.shape
    words = torch.zeros(k // pack, n, dtype=torch.int64, device=q.device)
    for j in range(pack):
        words |= q[j::pack].long() << (bits * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def ref_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) to e4m3 (ties to even) after clamping to +-448, as float64."""
    return (x.float() / scale.float()).clamp(-448, 448).to(FP8).double()


def ref_per_token_scale(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448


def ref_fp8_linear(x, w, ws, input_scale=None, bias=None) -> torch.Tensor:
    xs = ref_per_token_scale(x) if input_scale is None else input_scale.float().reshape(1, 1)
    y = (ref_quant_fp8(x, xs) @ w.double().t()) * xs.double() * ws.double().reshape(1, -1)
    return y + bias.double() if bias is not None else y


def ref_fp8_block_linear(x, w, s, bn, bk, bias=None) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    y = torch.zeros(m, n, dtype=torch.float64, device=x.device)
    for kb in range(math.ceil(k / bk)):
        cols = slice(kb * bk, min(k, (kb + 1) * bk))
        xb = x[:, cols]
        xs = ref_per_token_scale(xb)
        part = ref_quant_fp8(xb, xs) @ w[:, cols].double().t()
        ws = s[:, kb].double().repeat_interleave(bn)[:n]
        y += part * xs.double() * ws.reshape(1, -1)
    return y + bias.double() if bias is not None else y


# ---------------------------------------------------------------- checks (shared CPU / GPU)


def make_int(m, k, n, bits, group_size, dtype, device, perm, bias):
    qweight, scales, zeros, p = QG.random_int_weights(k, n, bits, group_size, dtype, device, act_order=perm)
    if group_size != -1 and dtype != BF16:
        zeros = zeros + 0.25  # zero points need not be integers: the tile-level fold must not assume it
    x = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    return x, qweight, scales, zeros, p, b


def check_w_int(device, path, dtype, bits, group_size, m, k, n, perm=False, bias=False, config=None):
    """One kernel path of the int GEMM against the float64 reference (NaN-poisoned output)."""
    x, qweight, scales, zeros, p, b = make_int(m, k, n, bits, group_size, dtype, device, perm, bias)
    gs = k if group_size == -1 else group_size
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    if path == "gemv":
        y = QG.w_int_gemv(x, qweight, scales, zeros, gs, bits, p, b, config=config, out=out)
    elif path == "fused":
        y = QG.w_int_dot(x, qweight, scales, zeros, gs, bits, p, b, config=config, out=out)
    elif path == "deq":
        y = QG.w_int_dequant_matmul(x, qweight, scales, zeros, gs, bits, p.long() if p is not None else None, b)
    elif path == "dispatch":
        y = QG.w_int_matmul(x, qweight, scales, zeros, group_size, bits, p, b)
    else:
        raise AssertionError(path)
    if path in ("gemv", "fused"):
        assert y.data_ptr() == out.data_ptr()
    assert_counters_reset()
    assert_close(
        y,
        ref_w_int(x, qweight, scales, zeros, group_size, bits, p, b),
        dtype,
        f"{path} b{bits} g{group_size} {dtype} M={m} K={k} N={n} perm={perm} bias={bias} cfg={config}",
    )


def assert_counters_reset() -> None:
    """The split-K fixup leaves every tile counter at zero for the next launch."""
    for key, counters in QC._COUNTERS.items():
        assert int(counters.abs().sum()) == 0, f"split-K counters on {key} not reset"


def check_dequant(device, dtype, bits, group_size, k, n):
    _, qweight, scales, zeros, _, _ = make_int(1, k, n, bits, group_size, dtype, device, False, False)
    gs = k if group_size == -1 else group_size
    out = torch.full((k, n), float("nan"), dtype=dtype, device=device)
    w = QG.dequantize_int_triton(qweight, scales, zeros, gs, bits, dtype, out=out)
    ref = ref_dequant(qweight, scales, zeros, group_size, bits)
    # Each element is (q - z) * s in float32, rounded once: exact up to that rounding.
    assert not torch.isnan(w).any(), "dequantize: an element was never written"
    torch.testing.assert_close(
        w.double(), ref.to(dtype).double(), atol=0, rtol=0, msg=f"dequantize b{bits} g{group_size} {dtype} K={k} N={n}"
    )


def check_quant(device, dtype, m, k, group=None, static=False):
    x = torch.randn(m, k, dtype=dtype, device=device) * torch.rand(m, 1, device=device).to(dtype) * 8
    x[m // 2] = 0  # an all-zero row: a tiny scale, zeros out
    if k > 3:
        x[0, :3] = torch.tensor([447.9, -0.001, 1e-6], dtype=dtype)  # near the max, subnormal, underflow
    if group is not None:
        xq, xs = QF.per_token_group_quant_fp8_triton(x, group)
        g = math.ceil(k / group)
        assert xs.shape == (m, g) and xq.shape == (m, k) and xq.dtype == FP8
        for gi in range(g):
            cols = slice(gi * group, min(k, (gi + 1) * group))
            s_ref = ref_per_token_scale(x[:, cols])
            torch.testing.assert_close(xs[:, gi : gi + 1], s_ref, atol=0, rtol=0, msg=f"group scale {gi}")
            torch.testing.assert_close(
                xq[:, cols].double(), ref_quant_fp8(x[:, cols], s_ref), atol=0, rtol=0, msg=f"group quant {gi}"
            )
        return
    if static:
        s = torch.tensor([0.02], device=device)
        xq, _ = QF.per_token_quant_fp8_triton(x, s)
        torch.testing.assert_close(xq.double(), ref_quant_fp8(x, s.reshape(1, 1)), atol=0, rtol=0, msg="static quant")
        return
    xq, xs = QF.per_token_quant_fp8_triton(x)
    s_ref = ref_per_token_scale(x)
    torch.testing.assert_close(xs, s_ref, atol=0, rtol=0, msg=f"per-token scale {dtype} K={k}")
    torch.testing.assert_close(
        xq.double(), ref_quant_fp8(x, s_ref), atol=0, rtol=0, msg=f"per-token quant {dtype} K={k}"
    )


def make_fp8(m, k, n, dtype, device, per_channel, bias):
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = (torch.randn(n, k, device=device) * 0.5).to(FP8)
    ws = torch.rand(n if per_channel else 1, device=device) * 0.01 + 1e-3
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    return x, w, ws, b


def check_fp8_gemm(device, dtype, m, k, n, per_channel=True, static=False, bias=False, config=None, backend="triton"):
    x, w, ws, b = make_fp8(m, k, n, dtype, device, per_channel, bias)
    inp = torch.tensor([0.03], device=device) if static else None
    if static:
        xq, xs = QF.per_token_quant_fp8_triton(x, inp)[0], inp
    else:
        xq, xs = QF.per_token_quant_fp8_triton(x)
    if backend == "triton":
        out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
        y = QF.fp8_gemm_triton(xq, xs, w, ws, b, dtype, config=config, out=out)
    else:
        y = QF.scaled_mm_linear(xq, xs, w, ws, b, dtype)
    assert_close(
        y,
        ref_fp8_linear(x, w, ws, inp, b),
        dtype,
        f"fp8 {backend} {dtype} M={m} K={k} N={n} per_channel={per_channel} static={static} cfg={config}",
    )
    assert_counters_reset()


def check_fp8_block(device, dtype, m, k, n, bn, bk, bias=False, config=None):
    x, w, _, b = make_fp8(m, k, n, dtype, device, True, bias)
    s = torch.rand(math.ceil(n / bn), math.ceil(k / bk), device=device) * 0.01 + 1e-3
    xq, xs = QF.per_token_group_quant_fp8_triton(x, bk)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    y = QF.fp8_block_gemm_triton(xq, xs, w, s, (bn, bk), b, dtype, config=config, out=out)
    assert_close(
        y,
        ref_fp8_block_linear(x, w, s, bn, bk, b),
        dtype,
        f"fp8 block {dtype} M={m} K={k} N={n} block=({bn},{bk}) cfg={config}",
    )
    assert_counters_reset()
    wd = QF.fp8_block_dequant_triton(w, s, (bn, bk), dtype)
    wr = (w.double() * s.double().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]).to(dtype)
    torch.testing.assert_close(wd, wr, atol=0, rtol=0, msg="fp8 block dequant")


def check_dispatch(device, dtype=F16):
    """The CUDA dispatch on CPU tensors: every path, act order past the fuse limit, 3-D x, and
    a variant that fails to compile falling back once (logged) to a correct path."""
    d = QG.W_INT_DISPATCH
    saved = (d.gemv_max_m, d.fused_max_m, d.fuse_perm_max_m)
    QG.set_w_int_dispatch(gemv_max_m=1, fused_max_m=48, fuse_perm_max_m=20)
    try:
        for m, path in ((1, "gemv"), (9, "fused"), (33, "fused"), (60, "deq")):
            assert QG.choose_path(m, 256, 72, 4, dtype)[0] == path
            assert QG.choose_path(m, 256, 72, 4, F32)[0] == ("deq" if m > 16 else path)  # fp32: exact, small tiles
            for perm, bias in ((False, True), (True, False)):
                check_w_int(device, "dispatch", dtype, 4, 128, m, 256, 72, perm=perm, bias=bias)
        x, qweight, scales, zeros, p, b = make_int(6, 128, 40, 8, 64, dtype, device, True, True)
        y = QG.w_int_matmul(x.view(2, 3, 128), qweight, scales, zeros, 64, 8, p, b)
        assert y.shape == (2, 3, 40)
        assert_close(y.view(6, 40), ref_w_int(x, qweight, scales, zeros, 64, 8, p, b), dtype, "dispatch 3-D x")
        assert QG.w_int_matmul(x[:0], qweight, scales, zeros, 64, 8).shape == (0, 40)
        # A config Triton rejects (BLOCK_N not a power of two) must fall back, not fail.
        bucket = QG.DOT_CONFIGS[0][1]
        QG.DOT_CONFIGS[0] = (QG.DOT_CONFIGS[0][0], dict(bucket, BLOCK_N=48))
        try:
            check_w_int(device, "dispatch", dtype, 4, 128, 5, 256, 100)
            assert any(key.startswith("fused/") and "BLOCK_N=48" in key for key in QC.failed_variants()), (
                QC.failed_variants()
            )
            check_w_int(device, "dispatch", dtype, 4, 128, 5, 256, 100)  # the known-bad variant is skipped
        finally:
            QG.DOT_CONFIGS[0] = (QG.DOT_CONFIGS[0][0], bucket)
    finally:
        QG.set_w_int_dispatch(gemv_max_m=saved[0], fused_max_m=saved[1], fuse_perm_max_m=saved[2])

    f = QF.FP8_DISPATCH
    saved8 = (f.backend, f.triton_max_m, f.block_dequant_min_m)
    try:
        for backend in ("triton", "scaled_mm"):  # scaled_mm may be missing for this dtype: then it falls back
            QF.set_fp8_dispatch(backend=backend, triton_max_m=0)
            for m, per_channel, static in ((1, True, False), (19, False, False), (7, False, True), (5, True, True)):
                x, w, ws, b = make_fp8(m, 192, 80, dtype, device, per_channel, True)
                inp = torch.tensor([0.03], device=device) if static else None
                y = QF.fp8_linear(x, w, ws, inp, b)
                assert_close(y, ref_fp8_linear(x, w, ws, inp, b), dtype, f"fp8_linear {backend} M={m}")
        QF.set_fp8_dispatch(block_dequant_min_m=16)
        for m in (3, 20):  # the block kernel, then dequantize + matmul (unquantized activations)
            x, w, _, b = make_fp8(m, 320, 72, dtype, device, True, True)
            s = torch.rand(math.ceil(72 / 32), math.ceil(320 / 64), device=device) * 0.01 + 1e-3
            y = QF.fp8_block_linear(x, w, s, (32, 64), b)
            ref = (
                ref_fp8_block_linear(x, w, s, 32, 64, b)
                if m < 16
                else (
                    x.double() @ (w.double() * s.double().repeat_interleave(32, 0)[:72].repeat_interleave(64, 1)).t()
                    + b.double()
                )
            )
            assert_close(y, ref, dtype, f"fp8_block_linear M={m}")
    finally:
        QF.set_fp8_dispatch(backend=saved8[0], triton_max_m=saved8[1], block_dequant_min_m=saved8[2])


# ---------------------------------------------------------------- CPU cases (interpreted)

G = "gemv"
FU = "fused"
JM = dict(JMAJOR=True)
EX = dict(JMAJOR=False, BLOCK_K=64)
SW_JM = dict(JM, SCALE_W=True)
SW_EX = dict(EX, SCALE_W=True)
CPU_CASES = {
    "int_gemv": [
        (check_w_int, dict(path=G, dtype=F32, bits=4, group_size=128, m=1, k=256, n=100, bias=True)),
        (check_w_int, dict(path=G, dtype=F16, bits=4, group_size=-1, m=2, k=384, n=72, perm=True)),
        (check_w_int, dict(path=G, dtype=F32, bits=8, group_size=32, m=1, k=128, n=40, perm=True, bias=True)),
        (check_w_int, dict(path=G, dtype=F16, bits=8, group_size=64, m=3, k=256, n=50)),
        (check_w_int, dict(path=G, dtype=F32, bits=4, group_size=32, m=1, k=512, n=64, config=dict(split=3))),
        (
            check_w_int,
            dict(
                path=G,
                dtype=F16,
                bits=4,
                group_size=128,
                m=2,
                k=512,
                n=40,
                bias=True,
                config=dict(split=3, fixup=False),
            ),
        ),  # split-K through the reduction kernel
        (
            check_w_int,
            dict(
                path=G,
                dtype=F32,
                bits=4,
                group_size=128,
                m=1,
                k=1024,
                n=40,
                perm=True,
                config=dict(BLOCK_N=16, BLOCK_R=64, split=2),
            ),
        ),  # a tile spanning 4 groups
        (check_w_int, dict(path=G, dtype=F32, bits=4, group_size=40, m=1, k=200, n=24, perm=True)),  # 5 rows/group
        (check_w_int, dict(path=G, dtype=F32, bits=4, group_size=-1, m=1, k=200, n=33)),  # K not a tile multiple
        (
            check_w_int,
            dict(
                path=G,
                dtype=F16,
                bits=4,
                group_size=64,
                m=1,
                k=256,
                n=300,
                config=dict(BLOCK_N=128, BLOCK_R=4, split=1),
            ),
        ),  # no split: bias in the kernel
    ],
    "int_fused": [
        (
            check_w_int,
            dict(path=FU, dtype=F32, bits=4, group_size=128, m=5, k=256, n=100, perm=True, bias=True, config=JM),
        ),
        (check_w_int, dict(path=FU, dtype=F16, bits=4, group_size=32, m=17, k=256, n=72, config=JM)),  # per-row
        (check_w_int, dict(path=FU, dtype=F32, bits=8, group_size=-1, m=33, k=192, n=48, perm=True, config=JM)),
        (check_w_int, dict(path=FU, dtype=F16, bits=8, group_size=64, m=3, k=256, n=40, bias=True, config=JM)),
        (
            check_w_int,
            dict(path=FU, dtype=F32, bits=4, group_size=64, m=16, k=384, n=64, config=dict(JMAJOR=True, split=3)),
        ),
        (
            check_w_int,
            dict(
                path=FU,
                dtype=F16,
                bits=4,
                group_size=128,
                m=18,
                k=512,
                n=40,
                bias=True,
                config=dict(JMAJOR=True, BLOCK_M=16, split=4, fixup=False),
            ),
        ),  # 2 M tiles x 4 splits
        (check_w_int, dict(path=FU, dtype=F32, bits=4, group_size=128, m=20, k=256, n=100, bias=True, config=EX)),
        (check_w_int, dict(path=FU, dtype=F16, bits=4, group_size=32, m=7, k=128, n=72, perm=True, config=EX)),
        (check_w_int, dict(path=FU, dtype=F32, bits=8, group_size=-1, m=40, k=200, n=48, config=EX)),
        (
            check_w_int,
            dict(path=FU, dtype=F16, bits=8, group_size=128, m=9, k=512, n=36, perm=True, config=dict(EX, split=2)),
        ),
        (check_w_int, dict(path=FU, dtype=F32, bits=4, group_size=40, m=3, k=200, n=24, config=EX)),
        # SCALE_W: the scale folded into the weight, one accumulator (word-major and expanded
        # tiles, split-K, bias, act order); a group spanning tiles keeps per-row scales instead.
        (check_w_int, dict(path=FU, dtype=F16, bits=4, group_size=128, m=21, k=384, n=72, bias=True, config=SW_JM)),
        (check_w_int, dict(path=FU, dtype=F32, bits=8, group_size=-1, m=6, k=256, n=40, perm=True, config=SW_JM)),
        (
            check_w_int,
            dict(path=FU, dtype=F16, bits=4, group_size=64, m=35, k=512, n=48, perm=True, config=dict(SW_EX, split=2)),
        ),
        (check_w_int, dict(path=FU, dtype=F32, bits=4, group_size=32, m=9, k=128, n=24, config=SW_EX)),
        (check_w_int, dict(path=FU, dtype=F32, bits=4, group_size=40, m=3, k=200, n=24, perm=True, config=JM)),
        (
            check_w_int,
            dict(
                path=FU,
                dtype=F32,
                bits=4,
                group_size=128,
                m=70,
                k=256,
                n=80,
                config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, JMAJOR=False, GROUP_M=2, split=1),
            ),
        ),
    ],
    "int_dequant": [
        (check_dequant, dict(dtype=F32, bits=4, group_size=128, k=256, n=100)),
        (check_dequant, dict(dtype=F16, bits=8, group_size=32, k=128, n=72)),
        (check_dequant, dict(dtype=F32, bits=4, group_size=-1, k=200, n=33)),
        (check_w_int, dict(path="deq", dtype=F32, bits=4, group_size=64, m=11, k=256, n=48, perm=True, bias=True)),
        (check_w_int, dict(path="deq", dtype=F16, bits=8, group_size=128, m=4, k=128, n=24)),
    ],
    "fp8_quant": [
        (check_quant, dict(dtype=F32, m=5, k=40)),
        (check_quant, dict(dtype=F16, m=3, k=300)),
        (check_quant, dict(dtype=F32, m=2, k=9000)),  # past one block: two passes over the row
        (check_quant, dict(dtype=F16, m=4, k=64, static=True)),
        (check_quant, dict(dtype=F32, m=3, k=320, group=128)),  # a partial last group
        (check_quant, dict(dtype=F16, m=5, k=256, group=64)),
    ],
    "fp8_gemm": [
        (check_fp8_gemm, dict(dtype=F32, m=1, k=256, n=72, per_channel=True, config=dict(split=2))),
        (check_fp8_gemm, dict(dtype=F16, m=19, k=384, n=100, per_channel=False, bias=True)),
        (check_fp8_gemm, dict(dtype=F32, m=33, k=160, n=64, per_channel=True, static=True)),
        (
            check_fp8_gemm,
            dict(dtype=F16, m=3, k=512, n=40, per_channel=False, static=True, bias=True, config=dict(split=3)),
        ),
        (check_fp8_gemm, dict(dtype=F32, m=70, k=256, n=48, config=dict(BLOCK_M=32, BLOCK_N=32, GROUP_M=2))),
        (check_fp8_gemm, dict(dtype=F16, m=5, k=512, n=40, bias=True, config=dict(split=4, fixup=False))),
        (check_fp8_block, dict(dtype=F16, m=3, k=384, n=200, bn=128, bk=128, bias=True)),
        (check_fp8_block, dict(dtype=F32, m=17, k=352, n=64, bn=32, bk=64, config=dict(split=2))),  # partial K block
        (check_fp8_block, dict(dtype=F32, m=40, k=256, n=72, bn=64, bk=128, bias=True)),
    ],
    "dispatch": [
        (check_dispatch, dict(dtype=F16)),
    ],
}


def _run_cpu_group(group: str) -> None:
    torch.manual_seed(0)
    QC.POISON_SCRATCH = True
    for fn, kwargs in CPU_CASES[group]:
        fn("cpu", **kwargs)
        print(f"ok {fn.__name__} {kwargs}", flush=True)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("group", sorted(CPU_CASES))
def test_interpreted(group):
    env = dict(os.environ, TRITON_INTERPRET="1", FASTSERVE_QUANT_INTERPRET_DISPATCH="1")
    proc = subprocess.run(
        [sys.executable, __file__, group], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=580
    )
    assert proc.returncode == 0, f"{group} failed under TRITON_INTERPRET=1:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("ok ") == len(CPU_CASES[group]), proc.stdout


@pytest.mark.timeout(600)
def test_bench_dry_run(tmp_path):
    """bench/quant_kernels.py end to end on tiny shapes through the interpreter: every case,
    the checks against the references, the analysis and the tables run (not the timings)."""
    env = dict(os.environ, TRITON_INTERPRET="1", FASTSERVE_QUANT_INTERPRET_DISPATCH="1")
    out = tmp_path / "quant.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "quant_kernels.py"),
            "--dry-run-cpu",
            "--models",
            "llama3-8b",
            "--out",
            str(out),
        ],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {
        "bf16",
        "int4:gemv",
        "int4:fused",
        "int4:deq",
        "int4",
        "int4-ao",
        "fp8:triton",
        "fp8b:triton",
        "fp8b:deq",
    } <= {r["method"] for r in rows}
    # CPU torch has no row-wise _scaled_mm: those rows report the error; every other case ran and was right.
    bad = [
        r for r in rows if ("error" in r and not r["method"].startswith("fp8:scaled_mm")) or r.get("rel_err", 0) > 1e-2
    ]
    assert not bad, bad[:5]
    assert report["sweep"] and all("ms" in r for r in report["sweep"]), report["sweep"][:3]
    assert "FASTSERVE_W_INT_DISPATCH=" in report["suggested"]["env_w_int"]
    assert "suggested:" in proc.stdout and "decoder-layer totals" in proc.stdout


# ---------------------------------------------------------------- CPU torch path (in process)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_w_int_matmul_cpu(bits, group_size, dtype):
    torch.manual_seed(bits * 1000 + group_size)
    for m, perm, bias in ((1, False, True), (7, True, False), (33, True, True)):
        x, qweight, scales, zeros, p, b = make_int(m, 256, 72, bits, group_size, dtype, "cpu", perm, bias)
        y = QG.w_int_matmul(x, qweight, scales, zeros, group_size, bits, p, b)
        assert y.dtype == dtype and y.shape == (m, 72)
        assert_close(
            y,
            ref_w_int(x, qweight, scales, zeros, group_size, bits, p, b),
            dtype,
            f"cpu b{bits} g{group_size} {dtype} M={m}",
        )
    w = QG.dequantize_int(qweight, scales, zeros, group_size, bits)
    assert w.dtype == scales.dtype
    torch.testing.assert_close(
        w.double(), ref_dequant(qweight, scales, zeros, group_size, bits).to(dtype).double(), atol=0, rtol=0
    )


def test_w_int_cpu_chunked_dequant_and_shapes():
    x, qweight, scales, zeros, _, _ = make_int(4, 512, 40, 4, 64, F32, "cpu", False, False)
    w = QG._dequantize_torch(qweight, scales, zeros, 64, 4, F32, chunk_elems=3 * 64 * 40)  # 3 groups a chunk
    torch.testing.assert_close(w.double(), ref_dequant(qweight, scales, zeros, 64, 4))
    y = QG.w_int_matmul(x.view(2, 2, 512), qweight, scales, zeros, 64, 4)
    assert y.shape == (2, 2, 40)
    assert QG.w_int_matmul(x[:0], qweight, scales, zeros, 64, 4).shape == (0, 40)


def test_act_order_contract_cpu():
    """GPTQ desc_act: rows in checkpoint order with a non-monotonic g_idx. The loader sorts
    rows by group (stable) once and keeps perm; x[:, perm] @ W_sorted must equal x @ W."""
    torch.manual_seed(3)
    k, n, gs, bits = 256, 48, 32, 4
    g_idx = torch.arange(k // gs).repeat_interleave(gs)[torch.randperm(k)]
    q = torch.randint(0, 16, (k, n))
    scales = torch.rand(k // gs, n) * 0.02 + 0.005
    zeros = torch.randint(0, 16, (k // gs, n)).float()
    w_orig = (q.double() - zeros.double()[g_idx]) * scales.double()[g_idx]
    perm = torch.sort(g_idx, stable=True).indices
    qweight = pack_int(q[perm], bits)
    torch.testing.assert_close(ref_unpack(qweight, bits), q[perm])
    x = torch.randn(5, k)
    y = QG.w_int_matmul(x, qweight, scales, zeros, gs, bits, perm.to(torch.int32))
    assert_close(y, x.double() @ w_orig, F32, "act order")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fp8_cpu(dtype):
    torch.manual_seed(5)
    for m, per_channel, static, bias in (
        (1, True, False, True),
        (9, False, False, False),
        (4, False, True, True),
        (6, True, True, False),
    ):
        x, w, ws, b = make_fp8(m, 192, 80, dtype, "cpu", per_channel, bias)
        inp = torch.tensor([0.03]) if static else None
        y = QF.fp8_linear(x, w, ws.reshape(-1, 1) if per_channel else ws, inp, b)
        assert y.dtype == dtype
        assert_close(y, ref_fp8_linear(x, w, ws, inp, b), dtype, f"cpu fp8 M={m} {per_channel} {static}")
        # The quantization itself stays close to the unquantized product (scales are applied once).
        exact = x.double() @ (w.double() * ws.double().reshape(-1, 1)).t() + (b.double() if b is not None else 0)
        assert ((y.double() - exact).norm() / exact.norm()).item() < 0.08
    xq, xs = QF.per_token_quant_fp8(x)
    torch.testing.assert_close(xs, ref_per_token_scale(x), atol=0, rtol=0)
    torch.testing.assert_close(xq.double(), ref_quant_fp8(x, xs), atol=0, rtol=0)
    for bn, bk in ((128, 128), (32, 64)):
        x, w, _, b = make_fp8(3, 352, 72, dtype, "cpu", True, True)
        s = torch.rand(math.ceil(72 / bn), math.ceil(352 / bk)) * 0.01 + 1e-3
        y = QF.fp8_block_linear(x.view(1, 3, 352), w, s, (bn, bk), b)
        assert y.shape == (1, 3, 72)
        assert_close(y.view(3, 72), ref_fp8_block_linear(x, w, s, bn, bk, b), dtype, f"cpu fp8 block {bn}x{bk}")
    wq, wsn = QF.prepare_fp8_weight(w, torch.rand(72, 1))
    assert wq.is_contiguous() and wsn.shape == (72,) and wsn.dtype == F32


def test_errors_name_the_argument():
    x, qweight, scales, zeros, _, _ = make_int(2, 256, 40, 4, 128, F32, "cpu", False, False)
    cases = [
        (lambda: QG.w_int_matmul(x, qweight, scales, zeros, 128, 3), "bits"),
        (lambda: QG.w_int_matmul(x, qweight.float(), scales, zeros, 128, 4), "qweight"),
        (lambda: QG.w_int_matmul(x[:, :128], qweight, scales, zeros, 128, 4), "x"),
        (lambda: QG.w_int_matmul(x, qweight, scales, zeros, 100, 4), "group_size"),
        (lambda: QG.w_int_matmul(x, qweight, scales, zeros, 64, 4), "scales"),
        (lambda: QG.w_int_matmul(x, qweight, scales, zeros[:1], 128, 4), "zeros"),
        (lambda: QG.w_int_matmul(x, qweight, scales, zeros, 128, 4, perm=torch.arange(10)), "perm"),
        (lambda: QG.w_int_matmul(x, qweight, scales, zeros, 128, 4, bias=torch.randn(41)), "bias"),
        (lambda: QG.w_int_matmul(x.to(torch.int32), qweight, scales, zeros, 128, 4), "x"),
        (lambda: QG.set_w_int_dispatch(gemv_max=2), "gemv_max"),
    ]
    xf, w, ws, _ = make_fp8(2, 64, 32, F32, "cpu", True, False)
    cases += [
        (lambda: QF.fp8_linear(xf, w.float(), ws), "weight"),
        (lambda: QF.fp8_linear(xf[:, :32], w, ws), "x"),
        (lambda: QF.fp8_linear(xf, w, torch.rand(5)), "weight_scale"),
        (lambda: QF.fp8_linear(xf, w, ws, input_scale=torch.rand(2)), "input_scale"),
        (lambda: QF.fp8_linear(xf, w, ws, bias=torch.randn(3)), "bias"),
        (lambda: QF.fp8_block_linear(xf, w, torch.rand(2, 2), (128, 128)), "weight_scale_inv"),
        (lambda: QF.fp8_block_linear(xf, w, torch.rand(1, 1), (128,)), "block_size"),
        (lambda: QF.per_token_quant_fp8(xf[0]), "x"),
        (lambda: QF.per_token_group_quant_fp8(xf, 0), "group_size"),
        (lambda: QF.set_fp8_dispatch(backend_name="x"), "backend_name"),
    ]
    for fn, field in cases:
        with pytest.raises(ValueError, match=field):
            fn()


def test_dispatch_settings_from_env():
    env = dict(
        os.environ,
        FASTSERVE_W_INT_DISPATCH="gemv_max_m=2,fused_max_m=64,fused_max_m.4096x28672=512",
        FASTSERVE_FP8_DISPATCH="backend=triton,triton_max_m=16,use_fast_accum=true",
    )
    code = (
        "import sys; sys.path.insert(0, 'python'); from fastserve.kernels import quant_gemm as G, quant_fp8 as F;"
        "d = G.W_INT_DISPATCH; f = F.FP8_DISPATCH;"
        "print(d.gemv_max_m, d.fused_max_m, d.fused_limit(4096, 28672), d.fused_limit(4096, 4096),"
        " f.backend, f.triton_max_m, f.use_fast_accum)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "64", "512", "64", "triton", "16", "True"]
    bad = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, FASTSERVE_FP8_DISPATCH="bakend=x"),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "FASTSERVE_FP8_DISPATCH" in bad.stderr and "bakend" in bad.stderr
    bad = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, FASTSERVE_W_INT_DISPATCH="fused_max_m.4096=5"),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "fused_max_m.<K>x<N>" in bad.stderr


def test_choose_path_thresholds():
    d = QG.W_INT_DISPATCH
    saved = (d.gemv_max_m, d.fused_max_m, dict(d.fused_max_m_by_shape))
    try:
        QG.set_w_int_dispatch(gemv_max_m=1, fused_max_m=128, fused_max_m_by_shape={(4096, 28672): 512})
        assert QG.choose_path(1, 4096, 4096, 4, BF16)[0] == "gemv"
        path, cfg = QG.choose_path(16, 4096, 4096, 4, BF16)
        assert path == "fused" and cfg["BLOCK_M"] == 16
        assert QG.choose_path(64, 4096, 4096, 4, BF16)[1]["BLOCK_M"] == 64
        assert QG.choose_path(129, 4096, 4096, 4, BF16)[0] == "deq"
        assert QG.choose_path(300, 4096, 28672, 4, BF16)[0] == "fused"
        QG.set_tuned_config(4, 4096, 4096, 16, BF16, dict(BLOCK_N=64))
        assert QG.choose_path(8, 4096, 4096, 4, BF16)[1]["BLOCK_N"] == 64
        assert QG.choose_path(8, 4096, 4096, 4, F16)[1]["BLOCK_N"] != 64
    finally:
        QG._TUNED.clear()
        d.gemv_max_m, d.fused_max_m, d.fused_max_m_by_shape = saved[0], saved[1], saved[2]
    ms = QG.warmup_row_counts(1024)
    assert ms[0] == 1 and ms[-1] == 1024 and len(ms) == len(set(ms))


def test_plan_split_k():
    dev = torch.device("cuda") if HAS_CUDA else torch.device("cpu")
    for programs in (1, 3, 16, 48, 500):
        for tiles in (1, 2, 7, 32, 224):
            split, per = QC.plan_split_k(programs, tiles, dev)
            assert 1 <= split <= tiles and (split - 1) * per < tiles <= split * per  # no empty split
    assert QC.plan_split_k(4, 64, dev, split=5) == (5, 13)


def test_fallback_runs_once_and_keeps_oom(caplog):
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("PassManager::run failed (simulated)")

    with caplog.at_level(logging.WARNING, logger="fastserve.kernels.quant"):
        assert QC.run_with_fallback("test/broken", broken, lambda: 7) == 7
        assert QC.run_with_fallback("test/broken", broken, lambda: 8) == 8
    assert len(calls) == 1 and "test/broken" in QC.failed_variants()
    assert sum("test/broken" in r.message for r in caplog.records) == 1
    with pytest.raises(torch.cuda.OutOfMemoryError):
        QC.run_with_fallback("test/oom", lambda: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")), lambda: 0)
    assert "test/oom" not in QC.failed_variants()
    QC._FAILED.pop("test/broken", None)


# ---------------------------------------------------------------- GPU, real sizes


@pytest.fixture
def poison():
    """NaN-filled split-K partials, and no variant may fall back during the test (a fallback
    would hide a fast variant that does not compile on this GPU behind a correct result)."""
    QC.POISON_SCRATCH = True
    before = set(QC.failed_variants())
    yield
    QC.POISON_SCRATCH = False
    new = {k: v for k, v in QC.failed_variants().items() if k not in before}
    assert not new, "variants fell back:\n" + "\n".join(f"{k}: {v[:300]}" for k, v in new.items())


W4_SHAPES = [(4096, 6144), (14336, 4096), (5120, 1000)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["gemv", "fused", "candidates", "deq+dispatch"])
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("k,n", W4_SHAPES)
def test_w4a16_paths_gpu(k, n, perm, path, poison):
    torch.manual_seed(k + n)
    if path == "gemv":
        for m in (1, 2):
            check_w_int("cuda", "gemv", BF16, 4, 128, m, k, n, perm=perm, bias=m == 2)
        check_w_int("cuda", "gemv", BF16, 4, 128, 1, k, n, perm=perm, bias=True, config=dict(fixup=False))
    elif path == "fused":
        for m in (1, 7, 16, 33, 64, 130, 300):
            check_w_int("cuda", "fused", BF16, 4, 128, m, k, n, perm=perm, bias=m == 7)
        check_w_int("cuda", "fused", BF16, 4, 128, 16, k, n, perm=perm, bias=True, config=dict(fixup=False))
    elif path == "candidates":
        for cfg in QG.TUNE_CANDIDATES["gemv"]:
            check_w_int("cuda", "gemv", BF16, 4, 128, 1, k, n, perm=perm, config=cfg)
        for bucket, m in (("dot16", 16), ("dot64", 64), ("dot256", 256)):
            for cfg in QG.TUNE_CANDIDATES[bucket]:
                check_w_int("cuda", "fused", BF16, 4, 128, m, k, n, perm=perm and m <= 64, config=cfg)
    else:
        for m in (1, 300):
            check_w_int("cuda", "deq", BF16, 4, 128, m, k, n, perm=perm)
        for m in (1, 16, 64, 256, 1024):
            check_w_int("cuda", "dispatch", BF16, 4, 128, m, k, n, perm=perm)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "bits,group_size,dtype", [(8, 128, BF16), (4, 128, F16), (4, -1, BF16), (4, 32, BF16), (8, -1, F16), (4, 64, F16)]
)
def test_w_int_variants_gpu(bits, group_size, dtype, poison):
    torch.manual_seed(bits + group_size)
    for m in (1, 16, 64, 256):
        check_w_int("cuda", "dispatch", dtype, bits, group_size, m, 4096, 4096, perm=m == 16, bias=m == 1)
    check_w_int("cuda", "fused", dtype, bits, group_size, 16, 4096, 1000, config=dict(JMAJOR=False))
    check_dequant("cuda", dtype, bits, group_size, 4096, 1000)


@pytest.mark.gpu
@gpu
def test_w_int_cuda_graph_gpu(poison):
    """Decode GEMMs are replayed from CUDA graphs: the split-K partials come from the graph's
    pool and the fixup counters must be back at zero after every replay."""
    torch.manual_seed(11)
    k, n = 4096, 6144
    qweight, scales, zeros, perm = QG.random_int_weights(k, n, 4, 128, BF16, "cuda", act_order=True)
    for m in (1, 16):
        x = torch.randn(m, k, dtype=BF16, device="cuda")
        QG.w_int_matmul(x, qweight, scales, zeros, 128, 4, perm)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = QG.w_int_matmul(x, qweight, scales, zeros, 128, 4, perm)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            assert_close(y, ref_w_int(x, qweight, scales, zeros, 128, 4, perm), BF16, f"graph replay M={m}")
            assert_counters_reset()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_fp8_quant_gpu(dtype):
    torch.manual_seed(12)
    for k in (4096, 14336, 27648):
        check_quant("cuda", dtype, 33, k)
    check_quant("cuda", dtype, 17, 5120, group=128)
    check_quant("cuda", dtype, 9, 4096, static=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "scaled_mm"])
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096), (5120, 1008)])
def test_fp8_linear_gpu(backend, k, n, poison):
    torch.manual_seed(k + n)
    for m, per_channel, static, bias in (
        (1, True, False, True),
        (16, True, False, False),
        (64, False, False, True),
        (300, True, False, False),
        (7, False, True, True),
        (256, True, True, False),
    ):
        check_fp8_gemm("cuda", BF16, m, k, n, per_channel, static, bias, backend=backend)
    if backend == "triton":
        check_fp8_gemm("cuda", BF16, 1, k, n, True, False, True, config=dict(fixup=False))
        check_fp8_gemm("cuda", F16, 16, k, n, True, False, True, backend=backend)
    else:
        try:  # row-wise scaling with a float16 output is not in every torch build; fp8_linear then falls back
            check_fp8_gemm("cuda", F16, 16, k, n, True, False, True, backend=backend)
        except RuntimeError as e:
            pytest.skip(f"torch._scaled_mm row-wise with float16 output: {str(e)[:200]}")


@pytest.mark.gpu
@gpu
def test_fp8_dispatch_gpu():
    torch.manual_seed(13)
    f = QF.FP8_DISPATCH
    saved = (f.backend, f.triton_max_m, f.block_dequant_min_m)
    try:
        for backend, tmax in (("scaled_mm", 0), ("scaled_mm", 16), ("triton", 0)):
            QF.set_fp8_dispatch(backend=backend, triton_max_m=tmax)
            for m in (1, 16, 17, 512):
                x, w, ws, b = make_fp8(m, 4096, 4096, BF16, "cuda", True, True)
                assert_close(
                    QF.fp8_linear(x, w, ws, None, b),
                    ref_fp8_linear(x, w, ws, None, b),
                    BF16,
                    f"fp8_linear {backend}/{tmax} M={m}",
                )
        QF.set_fp8_dispatch(block_dequant_min_m=512)
        for m in (1, 16, 200, 512, 2048):
            x, w, _, b = make_fp8(m, 4096, 6144, BF16, "cuda", True, True)
            s = torch.rand(6144 // 128, 4096 // 128, device="cuda") * 0.01 + 1e-3
            y = QF.fp8_block_linear(x, w, s, (128, 128), b)
            if m < 512:
                ref = ref_fp8_block_linear(x, w, s, 128, 128, b)
            else:
                wd = w.double() * s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
                ref = x.double() @ wd.t() + b.double()
            assert_close(y, ref, BF16, f"fp8_block_linear M={m}")
    finally:
        QF.set_fp8_dispatch(backend=saved[0], triton_max_m=saved[1], block_dequant_min_m=saved[2])
    # Where _scaled_mm lacked a variant the dispatcher fell back (correctly, as checked above); say which.
    fell = {k: v for k, v in QC.failed_variants().items() if k.startswith("scaled_mm")}
    if fell:
        print("scaled_mm variants that fell back to Triton:", fell)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k,n", [(4096, 28672), (5120, 7168), (14336, 4096)])
def test_fp8_block_gpu(k, n, poison):
    torch.manual_seed(k + n)
    for m in (1, 16, 64, 300):
        check_fp8_block("cuda", BF16, m, k, n, 128, 128, bias=m == 16)
    check_fp8_block("cuda", F16, 16, k, n, 128, 128)


@pytest.mark.gpu
@gpu
def test_warmup_gpu(poison):
    info = QG.warmup([(4096, 6144, True), (14336, 4096)], BF16, bits=4, group_size=128, max_m=512, act_order=True)
    assert info["seconds"] >= 0
    info = QG.warmup([(4096, 4096)], BF16, bits=4, group_size=128, max_m=64, tune=True)
    assert info["tuned"], "tuning picked no config"
    QG._TUNED.clear()
    QF.warmup([(4096, 6144, True)], BF16, max_m=512)
    QF.warmup([(4096, 6144)], BF16, max_m=64, block_size=(128, 128))


if __name__ == "__main__":
    _run_cpu_group(sys.argv[1])
