"""Weight-only int4 / int8 GEMMs (W4A16, W8A16): y = x[:, perm] @ W, W dequantized on the fly.

Layout (QUANT_CONTRACT.md; GPTQ-like, K = in_features, N = out_features, pack = 32 // bits):
  qweight int32 [K // pack, N], packed along K: value (k, n) is
      (qweight[k // pack, n] >> (bits * (k % pack))) & (2**bits - 1)
  scales, zeros [G, N] (G = K // group_size), W[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n]
  perm (act order) [K]: the loader sorted the rows by group once; the kernels gather x's columns.

Paths on CUDA, chosen per call by M (and shape) from `W_INT_DISPATCH` (thresholds from
bench/quant_kernels.py; set them with FASTSERVE_W_INT_DISPATCH="gemv_max_m=1,fused_max_m=256"):
  gemv   M <= gemv_max_m: no tensor cores; every weight element is unpacked once and multiplied
         on the FMA units, split-K over enough programs to keep all SMs loading.
  fused  M <= fused_max_m: tl.dot on tiles unpacked in registers, split-K while the (M, N)
         tiles alone would not fill the GPU.
  deq    above: dequantize into an activation-dtype [K, N] buffer (one pass) + cuBLAS.
Every path falls back (logged once) to the next safer one if its variant fails to compile.

Unpacking without int->float conversions (a quarter-rate instruction on Hopper): OR-ing an
integer below 2**23 into the mantissa of 2**23 gives the float 2**23 + value exactly, so a
nibble is `(bits & mask) | 0x4B000000` reinterpreted, minus 2**23. Nibbles in the upper half
of a word are first shifted down by 16 (once per word); within a half, the nibble is masked in
place (value * 2**(bits*i)) and the power of two is folded into the subtraction (exact).

Scales are applied once per tile, not per element, whenever a K tile lies inside one group:
sum_k x_k (q_k - z) s = s * sum_k x_k (q_k - z). The tensor-core kernel puts (q - z) into the
dot (exact in the activation dtype for the integer zero points every format has); the GEMV
kernel accumulates x * q and subtracts z * sum(x) per tile (no rounding of q - z at all).
Tiles spanning groups (small groups) take per-row scales.

CPU tensors (the CPU engine, CI) take a torch path: dequantize (vectorized, in chunks of K) to
the activation dtype and matmul. Nothing is cached between calls: a dequantized copy would
cost 4x (bf16) the weight memory the quantized checkpoint saves.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable

import torch
import triton
import triton.language as tl

from ._validate import dot_precision, require
from .quant_common import (
    apply_overrides,
    finish_split,
    output_buffer,
    plan_split_k,
    run_with_fallback,
    split_setup,
    splitk_epilogue,
    use_triton,
)

# A group size that no K reaches: every row is in group 0 (group_size -1 / == K).
_ONE_GROUP = 1 << 30
_MAGIC = 0x4B000000  # float32 2**23


# ---------------------------------------------------------------- dispatch settings


@dataclasses.dataclass
class WIntDispatch:
    """Which path serves which M. Shape-specific fused_max_m entries override the default."""

    gemv_max_m: int = 1
    fused_max_m: int = 256
    fuse_perm_max_m: int = 64  # act order: gather columns in-kernel up to here, else x[:, perm] first
    fused_max_m_by_shape: dict = dataclasses.field(default_factory=dict)  # (K, N) -> fused_max_m

    def fused_limit(self, k: int, n: int) -> int:
        return self.fused_max_m_by_shape.get((k, n), self.fused_max_m)


W_INT_DISPATCH = WIntDispatch()

# Tile configs of the fused kernel by M bucket: (largest M, config). JMAJOR: unpack word by
# word (eight dots of K = BLOCK_K / 8, no reshape); otherwise expand the packed tile to
# [BLOCK_K, BLOCK_N] with a broadcast-reshape and do one dot.
DOT_CONFIGS: list[tuple[int, dict]] = [
    (16, dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, JMAJOR=True, GROUP_M=1, num_warps=4, num_stages=3)),
    (32, dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, JMAJOR=True, GROUP_M=1, num_warps=4, num_stages=3)),
    (64, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, JMAJOR=True, GROUP_M=4, num_warps=4, num_stages=3)),
    (128, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, JMAJOR=False, GROUP_M=8, num_warps=8, num_stages=3)),
    (1 << 62, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, JMAJOR=True, GROUP_M=8, num_warps=8, num_stages=3)),
]
GEMV_CONFIG: dict = dict(BLOCK_N=256, BLOCK_R=16, num_warps=4, num_stages=2)

# Alternatives the benchmark sweep and warmup(tune=True) time against the defaults (few, so
# that tuning at engine start stays within seconds per shape). Compiled for sm_90 ahead of time
# (ptxas): none spills; BLOCK_M >= 64 issues wgmma, smaller tiles mma.sync. 128 x 256 tiles and
# 64 x 256 tiles spilled (255 registers) with a second (per-tile) accumulator; SCALE_W keeps one,
# so a 128 x 256 SCALE_W tile is offered.
TUNE_CANDIDATES: dict[str, list[dict]] = {
    "gemv": [
        dict(BLOCK_N=128, BLOCK_R=16, num_warps=4, num_stages=2),
        dict(BLOCK_N=512, BLOCK_R=8, num_warps=4, num_stages=2),
        dict(BLOCK_N=64, BLOCK_R=64, num_warps=4, num_stages=2),  # tiles span groups: per-row scales
        dict(BLOCK_N=32, BLOCK_R=128, num_warps=8, num_stages=2, split=1),
    ],  # many narrow programs, no split
    "dot16": [
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, JMAJOR=True, GROUP_M=1, num_warps=4, num_stages=3, SCALE_W=True),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, JMAJOR=True, GROUP_M=1, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, JMAJOR=True, GROUP_M=1, num_warps=8, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, JMAJOR=False, GROUP_M=1, num_warps=4, num_stages=3),
    ],
    "dot64": [
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, JMAJOR=False, GROUP_M=4, num_warps=4, num_stages=4, SCALE_W=True),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, JMAJOR=False, GROUP_M=4, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, JMAJOR=True, GROUP_M=4, num_warps=4, num_stages=3),
    ],
    "dot256": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, JMAJOR=False, GROUP_M=8, num_warps=8, num_stages=4, SCALE_W=True),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, JMAJOR=False, GROUP_M=8, num_warps=8, num_stages=3, SCALE_W=True),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, JMAJOR=True, GROUP_M=8, num_warps=8, num_stages=3, SCALE_W=True),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, JMAJOR=False, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, JMAJOR=False, GROUP_M=8, num_warps=4, num_stages=4),
    ],
}

# Configs picked by warmup(tune=True) / set_tuned_config: (bits, K, N, bucket max M, dtype) -> config.
_TUNED: dict[tuple, dict] = {}


def _load_env_dispatch() -> None:
    spec = os.environ.get("FASTSERVE_W_INT_DISPATCH", "")
    plain = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name.startswith("fused_max_m."):  # fused_max_m.4096x28672=512
            k, _, n = name.split(".", 1)[1].partition("x")
            try:
                W_INT_DISPATCH.fused_max_m_by_shape[(int(k), int(n))] = int(value)
            except ValueError:
                raise ValueError(f"FASTSERVE_W_INT_DISPATCH: {item!r} must read fused_max_m.<K>x<N>=<M>") from None
        else:
            plain.append(item)
    apply_overrides(W_INT_DISPATCH, ",".join(plain), "FASTSERVE_W_INT_DISPATCH")


_load_env_dispatch()


def set_w_int_dispatch(**settings) -> WIntDispatch:
    """Change thresholds at run time (the engine or a benchmark), e.g. fused_max_m=128."""
    for name, value in settings.items():
        require(
            hasattr(W_INT_DISPATCH, name),
            name,
            f"unknown dispatch setting; known: {[f.name for f in dataclasses.fields(W_INT_DISPATCH)]}",
        )
        setattr(W_INT_DISPATCH, name, value)
    return W_INT_DISPATCH


def set_tuned_config(bits: int, k: int, n: int, max_m: int, dtype: torch.dtype, config: dict) -> None:
    _TUNED[(bits, k, n, max_m, dtype)] = dict(config)


def _dot_bucket(m: int) -> tuple[int, dict]:
    for max_m, cfg in DOT_CONFIGS:
        if m <= max_m:
            return max_m, cfg
    return DOT_CONFIGS[-1]


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _unpack(q, q_hi, J: tl.constexpr, BITS: tl.constexpr, magic):
    """Value J of every packed word of q (bits BITS*J ...), as exact float32; q_hi = q >> 16.

    magic is 0x4B000000 passed at run time: as a register operand ptxas fuses the mask and the
    OR into one LOP3 (with both as immediates it emitted two)."""
    HALF: tl.constexpr = 16 // BITS
    I: tl.constexpr = J % HALF
    MASK: tl.constexpr = ((1 << BITS) - 1) << (BITS * I)
    INV: tl.constexpr = 1.0 / (1 << (BITS * I))
    OFFSET: tl.constexpr = 8388608.0 / (1 << (BITS * I))
    if J < HALF:
        word = q
    else:
        word = q_hi
    v = ((word & MASK) | magic).to(tl.float32, bitcast=True)
    return v * INV - OFFSET


@triton.jit(do_not_specialize=["M", "tiles_per_split", "num_splits"])
def _w_int_gemv_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    K,
    GS,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_om,
    tiles_per_split,
    num_tiles,
    num_splits,
    magic,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FIXUP: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """One row of x per program (axis 2) against BLOCK_N columns over one split of K, in tiles
    of BLOCK_R packed rows (BLOCK_R * PACK values of K).

    A tile inside one group folds its scale/zero into the tile's column sums; ROW_SCALES (tiles
    spanning groups) folds them per packed row and reduces the rows once at the end."""
    PACK: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_R * PACK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    kp = K // PACK
    acc = tl.zeros([BLOCK_N], tl.float32)
    acc_rows = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    for tile in range(t_start, t_end):
        rows = tile * BLOCK_R + offs_r
        rmask = rows < kp
        wmask = rmask[:, None] & nmask[None, :]
        if EVEN_K:
            q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qk + offs_n[None, :], mask=nmask[None, :], other=0)
        else:
            q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qk + offs_n[None, :], mask=wmask, other=0)
        q_hi = q >> 16
        t = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        xs = tl.zeros([BLOCK_R], tl.float32)
        for j in tl.static_range(PACK):
            k = rows * PACK + j
            if HAS_PERM:
                k = tl.load(perm_ptr + k, mask=rmask, other=0)
            if EVEN_K:  # unmasked: the PACK loads of a row are adjacent and can merge into one
                xj = tl.load(x_row + k).to(tl.float32)
            else:
                xj = tl.load(x_row + k, mask=rmask, other=0.0).to(tl.float32)
            t += xj[:, None] * _unpack(q, q_hi, j, BITS, magic)
            xs += xj
        if ROW_SCALES:
            sg = ((rows * PACK) // GS).to(tl.int64)[:, None] * stride_sg + offs_n[None, :]
            s_r = tl.load(s_ptr + sg, mask=wmask, other=0.0).to(tl.float32)
            z_r = tl.load(z_ptr + sg, mask=wmask, other=0.0).to(tl.float32)
            acc_rows += s_r * (t - z_r * xs[:, None])
        else:
            g = (tile * BLOCK_K) // GS
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=nmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=nmask, other=0.0).to(tl.float32)
            acc += s * (tl.sum(t, axis=0) - z * tl.sum(xs, axis=0))
    if ROW_SCALES:
        acc = tl.sum(acc_rows, axis=0)
    splitk_epilogue(
        acc[None, :],
        m + tl.arange(0, 1),
        offs_n,
        M,
        N,
        pid_k,
        num_splits,
        m * tl.num_programs(0) + pid_n,
        part_ptr,
        counter_ptr,
        bias_ptr,
        out_ptr,
        stride_om,
        HAS_BIAS,
        SPLIT,
        FIXUP,
    )


@triton.jit(do_not_specialize=["M", "tiles_per_split", "num_splits"])
def _w_int_dot_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    K,
    GS,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_om,
    tiles_per_split,
    num_tiles,
    num_splits,
    magic,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    JMAJOR: tl.constexpr,
    TILE_SCALE: tl.constexpr,
    SCALE_W: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FIXUP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] of y over one split of K with tl.dot on weights unpacked in registers.

    TILE_SCALE: each K tile lies inside one group; scales/zeros are applied to the tile's dot.
    SCALE_W (with TILE_SCALE): the tile's scale goes into the weight instead, ((q - z) * s)
    rounded to the activation dtype as the dequantize path rounds it: one accumulator that the
    dots chain into, rather than a per-tile product plus a scaled add (registers, and wgmma
    accumulating in place, for the large tiles).
    Otherwise each row's dequantized value (q - z) * s goes into the dot."""
    PACK: tl.constexpr = 32 // BITS
    BLOCK_R: tl.constexpr = BLOCK_K // PACK
    VMASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks walk the columns together, so their weight tiles are
    # read from DRAM once and from L2 by the others.
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    dtype = x_ptr.dtype.element_ty
    kp = K // PACK
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    for tile in range(t_start, t_end):
        if TILE_SCALE:
            # The zero point goes into the weight ((q - z) is exact in the activation dtype for
            # integer zeros) and the scale onto the tile's dot: no per-tile sum of x is needed,
            # whose cross-warp reductions cost a barrier pair per dot (sm_90 SASS).
            g0 = (tile * BLOCK_K) // GS
            z_t = tl.load(z_ptr + g0 * stride_sg + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
            if SCALE_W:
                s_t = tl.load(s_ptr + g0 * stride_sg + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
            else:
                t = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if JMAJOR:
            rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = rows < kp
            wmask = rmask[:, None] & nmask[None, :]
            q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qk + offs_n[None, :], mask=wmask, other=0)
            q_hi = q >> 16
            if not TILE_SCALE:
                g = (rows * PACK) // GS
                sg = g.to(tl.int64)[:, None] * stride_sg + offs_n[None, :]
                s_r = tl.load(s_ptr + sg, mask=wmask, other=0.0).to(tl.float32)
                z_r = tl.load(z_ptr + sg, mask=wmask, other=0.0).to(tl.float32)
            for j in tl.static_range(PACK):
                k = rows * PACK + j
                if HAS_PERM:
                    k = tl.load(perm_ptr + k, mask=rmask, other=0)
                xj = tl.load(x_rows + k[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
                v = _unpack(q, q_hi, j, BITS, magic)
                if SCALE_W:
                    acc = tl.dot(xj, ((v - z_t) * s_t).to(dtype), acc, input_precision=DOT_PREC)
                elif TILE_SCALE:
                    t = tl.dot(xj, (v - z_t).to(dtype), t, input_precision=DOT_PREC)
                else:
                    acc = tl.dot(xj, ((v - z_r) * s_r).to(dtype), acc, input_precision=DOT_PREC)
        else:
            rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
            q = tl.load(
                q_ptr + rows.to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                mask=(rows < kp)[:, None] & nmask[None, :],
                other=0,
            )
            # [R, N] words -> [R * PACK, N] rows (row r * PACK + j holds word r), then shift.
            qk = tl.reshape(tl.broadcast_to(q[:, None, :], (BLOCK_R, PACK, BLOCK_N)), (BLOCK_K, BLOCK_N))
            offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            shift = (offs_k % PACK) * BITS
            v = (((qk >> shift[:, None]) & VMASK) | magic).to(tl.float32, bitcast=True) - 8388608.0
            if HAS_PERM:
                kk = tl.load(perm_ptr + offs_k, mask=kmask, other=0)
            else:
                kk = offs_k
            xt = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            if SCALE_W:
                acc = tl.dot(xt, ((v - z_t) * s_t).to(dtype), acc, input_precision=DOT_PREC)
            elif TILE_SCALE:
                t = tl.dot(xt, (v - z_t).to(dtype), input_precision=DOT_PREC)
            else:
                sg = (offs_k // GS).to(tl.int64)[:, None] * stride_sg + offs_n[None, :]
                smask = kmask[:, None] & nmask[None, :]
                s_k = tl.load(s_ptr + sg, mask=smask, other=0.0).to(tl.float32)
                z_k = tl.load(z_ptr + sg, mask=smask, other=0.0).to(tl.float32)
                acc = tl.dot(xt, ((v - z_k) * s_k).to(dtype), acc, input_precision=DOT_PREC)
        if TILE_SCALE and not SCALE_W:
            s = tl.load(s_ptr + g0 * stride_sg + offs_n, mask=nmask, other=0.0).to(tl.float32)
            acc += s[None, :] * t
    splitk_epilogue(
        acc,
        offs_m,
        offs_n,
        M,
        N,
        pid_k,
        num_splits,
        pid,
        part_ptr,
        counter_ptr,
        bias_ptr,
        out_ptr,
        stride_om,
        HAS_BIAS,
        SPLIT,
        FIXUP,
    )


@triton.jit
def _dequant_int_kernel(
    q_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    GS,
    stride_qk,
    stride_sg,
    stride_ok,
    magic,
    BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < K // PACK)[:, None] & (offs_n < N)[None, :]
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qk + offs_n[None, :], mask=mask, other=0)
    q_hi = q >> 16
    sg = ((rows * PACK) // GS).to(tl.int64)[:, None] * stride_sg + offs_n[None, :]
    s = tl.load(s_ptr + sg, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sg, mask=mask, other=0.0).to(tl.float32)
    for j in tl.static_range(PACK):
        w = (_unpack(q, q_hi, j, BITS, magic) - z) * s
        k = rows.to(tl.int64) * PACK + j
        tl.store(out_ptr + k[:, None] * stride_ok + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- argument checks


def _check_weights(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int
) -> tuple[int, int, int]:
    """(K, N, group size with -1 resolved) after checking the weights against the layout."""
    require(bits in (4, 8), "bits", f"must be 4 or 8, got {bits}")
    pack = 32 // bits
    require(
        qweight.dtype == torch.int32 and qweight.dim() == 2,
        "qweight",
        f"must be int32 [K // {pack}, N], got {qweight.dtype} {tuple(qweight.shape)}",
    )
    k = qweight.shape[0] * pack
    n = qweight.shape[1]
    require(isinstance(group_size, int), "group_size", f"must be an int, got {type(group_size).__name__}")
    gs = k if group_size in (-1, k) else int(group_size)
    require(
        gs > 0 and k % gs == 0 and gs % pack == 0,
        "group_size",
        f"{group_size} must be -1 or a positive divisor of K={k} that is a multiple of {pack}",
    )
    g = k // gs
    require(
        scales.shape == (g, n) and scales.is_floating_point(),
        "scales",
        f"must be floating [G={g}, N={n}] for group_size {group_size}, got {scales.dtype} {tuple(scales.shape)}",
    )
    require(
        zeros.shape == (g, n) and zeros.is_floating_point(),
        "zeros",
        f"must be floating [G={g}, N={n}] (unpacked real zero points), got {zeros.dtype} {tuple(zeros.shape)}",
    )
    for name, t in (("scales", scales), ("zeros", zeros)):
        require(t.device == qweight.device, name, f"is on {t.device}, qweight on {qweight.device}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        require(t.stride(-1) == 1, name, "last dimension must be contiguous")
    return k, n, gs


def _check(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[int, int, int]:
    """_check_weights plus the activations, perm and bias."""
    k, n, gs = _check_weights(qweight, scales, zeros, group_size, bits)
    require(x.shape[-1] == k, "x", f"last dim {x.shape[-1]} must equal K = qweight.shape[0] * {32 // bits} = {k}")
    require(
        x.dtype in (torch.float16, torch.bfloat16, torch.float32),
        "x",
        f"must be float16, bfloat16 or float32, got {x.dtype}",
    )
    require(qweight.device == x.device, "qweight", f"is on {qweight.device}, x on {x.device}")
    if perm is not None:
        require(
            perm.dtype in (torch.int32, torch.int64) and perm.shape == (k,),
            "perm",
            f"must be int32/int64 [K={k}], got {perm.dtype} {tuple(perm.shape)}",
        )
        require(perm.device == x.device, "perm", f"is on {perm.device}, x on {x.device}")
    if bias is not None:
        require(bias.shape == (n,), "bias", f"must be [N={n}], got {tuple(bias.shape)}")
        require(bias.device == x.device, "bias", f"is on {bias.device}, x on {x.device}")
    return k, n, gs


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---------------------------------------------------------------- torch path (CPU, fallback)


def _dequantize_torch(
    qweight, scales, zeros, gs: int, bits: int, dtype: torch.dtype, chunk_elems: int = 1 << 24
) -> torch.Tensor:
    pack = 32 // bits
    kp, n = qweight.shape
    k = kp * pack
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device).view(1, pack, 1)
    # Chunks of whole groups bound the int32/float32 temporaries.
    groups_per_chunk = max(1, chunk_elems // max(gs * n, 1))
    for g0 in range(0, k // gs, groups_per_chunk):
        g1 = min(k // gs, g0 + groups_per_chunk)
        rows = slice(g0 * gs // pack, g1 * gs // pack)
        q = ((qweight[rows].unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(g1 - g0, gs, n)
        w = (q.float() - zeros[g0:g1].float().unsqueeze(1)) * scales[g0:g1].float().unsqueeze(1)
        out[g0 * gs : g1 * gs] = w.reshape(-1, n).to(dtype)
    return out


def _matmul_dequantized(x2, w, bias):
    if bias is not None:
        return torch.addmm(bias.to(x2.dtype), x2, w)
    return x2 @ w


# ---------------------------------------------------------------- launchers (CUDA or interpreter)


def dequantize_int_triton(
    qweight, scales, zeros, gs: int, bits: int, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    pack = 32 // bits
    kp, n = qweight.shape
    k = kp * pack
    if out is None:
        out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    block_r, block_n = 16, min(256, max(16, triton.next_power_of_2(n)))
    _dequant_int_kernel[(triton.cdiv(kp, block_r), triton.cdiv(n, block_n))](
        qweight,
        scales,
        zeros,
        out,
        n,
        k,
        gs if gs < k else _ONE_GROUP,
        qweight.stride(0),
        scales.stride(0),
        out.stride(0),
        _MAGIC,
        BITS=bits,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def _largest_pow2_divisor(v: int) -> int:
    return v & -v


def w_int_gemv(
    x2,
    qweight,
    scales,
    zeros,
    gs: int,
    bits: int,
    perm=None,
    bias=None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GEMV kernel on x2 [M, K] (meant for M of 1 or 2: each row re-reads the weights)."""
    cfg = dict(GEMV_CONFIG, **(config or {}))
    pack = 32 // bits
    m, k = x2.shape
    kp, n = qweight.shape
    block_r = int(cfg["BLOCK_R"])
    block_n = min(int(cfg["BLOCK_N"]), max(16, triton.next_power_of_2(n)))
    row_scales = gs < k and gs % (block_r * pack) != 0
    num_tiles = triton.cdiv(kp, block_r)
    n_blocks = triton.cdiv(n, block_n)
    split, per = plan_split_k(
        n_blocks * m,
        num_tiles,
        x2.device,
        waves=cfg.get("waves", 4.0),
        min_tiles=cfg.get("min_tiles", 2),
        split=cfg.get("split"),
    )
    out = output_buffer(out, m, n, x2.dtype, x2.device)
    part, counters, fixup = split_setup(split, n_blocks * m, m, n, out, cfg.get("fixup"))
    _w_int_gemv_kernel[(n_blocks, split, m)](
        x2,
        qweight,
        scales,
        zeros,
        perm if perm is not None else qweight,
        bias if bias is not None else out,
        out,
        part,
        counters,
        m,
        n,
        k,
        gs if gs < k else _ONE_GROUP,
        x2.stride(0),
        qweight.stride(0),
        scales.stride(0),
        out.stride(0),
        per,
        num_tiles,
        split,
        _MAGIC,
        BITS=bits,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        ROW_SCALES=row_scales,
        HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None,
        SPLIT=split > 1,
        FIXUP=fixup,
        EVEN_K=kp % block_r == 0,
        num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]),
    )
    return finish_split(part, bias, out, fixup)


def w_int_dot(
    x2,
    qweight,
    scales,
    zeros,
    gs: int,
    bits: int,
    perm=None,
    bias=None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused unpack + tl.dot kernel on x2 [M, K] with the config of M's bucket (or `config`)."""
    m, k = x2.shape
    cfg = dict(_dot_bucket(m)[1], **(config or {}))
    pack = 32 // bits
    kp, n = qweight.shape
    jmajor = bool(cfg["JMAJOR"])
    block_k = int(cfg["BLOCK_K"])
    if jmajor:
        block_k = max(block_k, 16 * pack)  # each word-slice dot needs K >= 16
    block_m = min(int(cfg["BLOCK_M"]), max(16, triton.next_power_of_2(m)))
    block_n = min(int(cfg["BLOCK_N"]), max(16, triton.next_power_of_2(n)))
    num_stages = int(cfg["num_stages"])
    if x2.dtype == torch.float32:  # exact fp32 dots run on the FMA units: larger tiles spill (sm_90 ptxas)
        block_m, block_n, num_stages = min(block_m, 16), min(block_n, 64), min(num_stages, 2)
    tile_scale = gs >= k or gs % block_k == 0
    scale_w = tile_scale and bool(cfg.get("SCALE_W", False))
    num_tiles = triton.cdiv(k, block_k)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # Partial sums cost 4 bytes x M x N per split (written, then read back, mostly from L2):
    # keep them under half the weight bytes.
    weight_bytes = kp * n * 4
    max_split = max(1, min(16, weight_bytes // max(1, 2 * m * n * 4)))
    split, per = plan_split_k(
        programs,
        num_tiles,
        x2.device,
        waves=cfg.get("waves", 2.0),
        min_tiles=cfg.get("min_tiles", 2),
        max_split=max_split,
        split=cfg.get("split"),
    )
    out = output_buffer(out, m, n, x2.dtype, x2.device)
    part, counters, fixup = split_setup(split, programs, m, n, out, cfg.get("fixup"))
    _w_int_dot_kernel[(programs, split)](
        x2,
        qweight,
        scales,
        zeros,
        perm if perm is not None else qweight,
        bias if bias is not None else out,
        out,
        part,
        counters,
        m,
        n,
        k,
        gs if gs < k else _ONE_GROUP,
        x2.stride(0),
        qweight.stride(0),
        scales.stride(0),
        out.stride(0),
        per,
        num_tiles,
        split,
        _MAGIC,
        BITS=bits,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=int(cfg["GROUP_M"]),
        JMAJOR=jmajor,
        TILE_SCALE=tile_scale,
        SCALE_W=scale_w,
        HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None,
        SPLIT=split > 1,
        FIXUP=fixup,
        DOT_PREC=dot_precision(x2.dtype),
        num_warps=int(cfg["num_warps"]),
        num_stages=num_stages,
    )
    return finish_split(part, bias, out, fixup)


def w_int_dequant_matmul(
    x2, qweight, scales, zeros, gs: int, bits: int, perm=None, bias=None, triton_dequant: bool = True
) -> torch.Tensor:
    """Dequantize into an activation-dtype [K, N] buffer, then cuBLAS (or torch on CPU)."""
    if perm is not None:
        x2 = x2.index_select(1, perm)
    if triton_dequant:
        w = dequantize_int_triton(qweight, scales, zeros, gs, bits, x2.dtype)
    else:
        w = _dequantize_torch(qweight, scales, zeros, gs, bits, x2.dtype)
    return _matmul_dequantized(x2, w, bias)


def _cfg_key(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))


def choose_path(m: int, k: int, n: int, bits: int, dtype: torch.dtype) -> tuple[str, dict]:
    """("gemv" | "fused" | "deq", config) that w_int_matmul runs for this M and shape on CUDA."""
    d = W_INT_DISPATCH
    if m <= d.gemv_max_m:
        return "gemv", dict(GEMV_CONFIG, **_TUNED.get((bits, k, n, 0, dtype), {}))
    # float32 (exact dots, for parity with a float32 reference) fuses only small M: cuBLAS's
    # float32 GEMM on the dequantized weight is faster above.
    if m <= (min(16, d.fused_limit(k, n)) if dtype == torch.float32 else d.fused_limit(k, n)):
        max_m, cfg = _dot_bucket(m)
        return "fused", dict(cfg, **_TUNED.get((bits, k, n, max_m, dtype), {}))
    return "deq", {}


# ---------------------------------------------------------------- entry points


def dequantize_int(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """W [K, N] in scales' dtype: (q - zeros) * scales, computed in float32 then rounded."""
    k, n, gs = _check_weights(qweight, scales, zeros, group_size, bits)
    dtype = scales.dtype if scales.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if not use_triton(qweight):
        return _dequantize_torch(qweight, scales, zeros, gs, bits, dtype)
    return run_with_fallback(
        f"dequant_int/b{bits}/{dtype}",
        lambda: dequantize_int_triton(qweight, scales, zeros, gs, bits, dtype),
        lambda: _dequantize_torch(qweight, scales, zeros, gs, bits, dtype),
    )


def w_int_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = x[..., perm] @ W (+ bias) in x's dtype; x [..., K] float16/bfloat16/float32.

    W [K, N] = (q - zeros) * scales per group of group_size rows (-1: one group), q unpacked
    from qweight int32 [K // (32 // bits), N]. See the module docstring for the paths."""
    k, n, gs = _check(x, qweight, scales, zeros, group_size, bits, perm, bias)
    lead = x.shape[:-1]
    x2 = _rows(x)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if not use_triton(x2):
        y = w_int_dequant_matmul(
            x2, qweight, scales, zeros, gs, bits, perm.long() if perm is not None else None, bias, triton_dequant=False
        )
        return y.view(*lead, n)
    path, cfg = choose_path(m, k, n, bits, x2.dtype)
    if perm is not None and m > W_INT_DISPATCH.fuse_perm_max_m:
        x2, perm = x2.index_select(1, perm), None
    args = (x2, qweight, scales, zeros, gs, bits, perm, bias)

    def deq():
        return run_with_fallback(
            f"deq/b{bits}/{x2.dtype}",
            lambda: w_int_dequant_matmul(*args),
            lambda: w_int_dequant_matmul(*args, triton_dequant=False),
        )

    if path == "gemv":
        y = run_with_fallback(
            f"gemv/b{bits}/{x2.dtype}/p{perm is not None}/{_cfg_key(cfg)}", lambda: w_int_gemv(*args, config=cfg), deq
        )
    elif path == "fused":
        y = run_with_fallback(
            f"fused/b{bits}/{x2.dtype}/p{perm is not None}/{_cfg_key(cfg)}", lambda: w_int_dot(*args, config=cfg), deq
        )
    else:
        y = deq()
    return y.view(*lead, n)


# ---------------------------------------------------------------- warm-up (engine start)


def warmup_row_counts(max_m: int) -> list[int]:
    """One M per (path, bucket, split-or-not) the dispatcher can pick up to max_m."""
    d = W_INT_DISPATCH
    ms = {1, min(max_m, max(1, d.gemv_max_m)), min(max_m, d.gemv_max_m + 1)}
    lo = d.gemv_max_m
    for hi, _ in DOT_CONFIGS:
        top = min(hi, d.fused_max_m, max_m)
        if top > lo:
            ms.update({lo + 1, top})
        lo = max(lo, hi)
    if max_m > d.fused_max_m:
        ms.update({d.fused_max_m + 1, max_m})
    return sorted(m for m in ms if 1 <= m <= max_m)


def random_int_weights(
    k: int,
    n: int,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    device,
    act_order: bool = False,
    generator: torch.Generator | None = None,
):
    """Random (qweight, scales, zeros, perm) in the contract's layout (tests, benchmarks, warm-up)."""
    pack = 32 // bits
    gs = k if group_size == -1 else group_size
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // pack, n), dtype=torch.int32, device=device, generator=generator)
    scales = (torch.rand(k // gs, n, device=device, generator=generator) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 2**bits, (k // gs, n), device=device, generator=generator).to(dtype)
    perm = torch.randperm(k, device=device, generator=generator).to(torch.int32) if act_order else None
    return qweight, scales, zeros, perm


def warmup(
    shapes: Iterable[tuple],
    dtype: torch.dtype = torch.bfloat16,
    bits: int = 4,
    group_size: int = 128,
    max_m: int = 256,
    act_order: bool = False,
    device: str | torch.device = "cuda",
    tune: bool | None = None,
) -> dict:
    """Compile (and with tune=True, pick among TUNE_CANDIDATES for) every kernel variant the
    dispatcher can choose for these layer shapes up to max_m rows, before serving.

    shapes: (K, N) or (K, N, has_bias) per distinct linear layer. tune defaults to
    FASTSERVE_QUANT_AUTOTUNE=1. Returns {"seconds": ..., "tuned": {...}}."""
    if tune is None:
        tune = os.environ.get("FASTSERVE_QUANT_AUTOTUNE") == "1"
    t0 = time.perf_counter()
    tuned = {}
    for shape in shapes:
        k, n = int(shape[0]), int(shape[1])
        has_bias = bool(shape[2]) if len(shape) > 2 else False
        gs = k if group_size in (-1, k) else group_size
        qweight, scales, zeros, perm = random_int_weights(k, n, bits, group_size, dtype, device, act_order)
        bias = torch.randn(n, dtype=dtype, device=device) if has_bias else None
        if tune:
            tuned.update(_tune_shape(k, n, bits, gs, dtype, device, qweight, scales, zeros, perm, bias, max_m))
        for m in warmup_row_counts(max_m):
            x = torch.randn(m, k, dtype=dtype, device=device)
            w_int_matmul(x, qweight, scales, zeros, group_size, bits, perm, bias)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "tuned": tuned}


def _time_ms(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _tune_shape(k, n, bits, gs, dtype, device, qweight, scales, zeros, perm, bias, max_m) -> dict:
    d = W_INT_DISPATCH
    picks = {}
    plan = [(0, 1, "gemv", GEMV_CONFIG)] if d.gemv_max_m >= 1 else []
    for max_bucket, cfg in DOT_CONFIGS:
        m = min(max_bucket, d.fused_limit(k, n), max_m)
        if m > d.gemv_max_m and (not plan or plan[-1][1] < m):
            name = "dot16" if max_bucket <= 16 else "dot64" if max_bucket <= 64 else "dot256"
            plan.append((max_bucket, m, name, cfg))
    for bucket, m, name, default in plan:
        x = torch.randn(m, k, dtype=dtype, device=device)
        launch = w_int_gemv if name == "gemv" else w_int_dot
        best, best_ms = None, float("inf")
        for cand in [default] + TUNE_CANDIDATES.get(name, []):
            try:
                ms = _time_ms(lambda: launch(x, qweight, scales, zeros, gs, bits, perm, bias, config=cand))
            except Exception:  # noqa: BLE001 - a candidate that does not compile here is skipped
                continue
            if ms < best_ms:
                best, best_ms = cand, ms
        if best is not None:
            set_tuned_config(bits, k, n, bucket, dtype, best)
            picks[f"{k}x{n}/m{m}"] = dict(best, ms=round(best_ms, 4))
    return picks
