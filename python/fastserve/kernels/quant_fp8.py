"""FP8 W8A8 GEMMs (Hopper / Ada): per-tensor or per-channel weight scales with dynamic per-token
(or static per-tensor) activation scales, and block-wise weights (DeepSeek-V3 / Qwen3-FP8:
weight_scale_inv [ceil(N/bn), ceil(K/bk)], activations quantized per token and per bk columns).

Layout (QUANT_CONTRACT.md): weight float8_e4m3fn [N, K] (nn.Linear orientation; K contiguous is
what both cuBLAS's FP8 GEMM (weight.t() is column-major) and FP8 wgmma (K-major B) want, so
`prepare_fp8_weight` only normalizes, never transposes); weight_scale float32 [1] or [N]; a
dequant multiplier: W ~= weight.float() * scale.

CUDA paths, from `FP8_DISPATCH` (FASTSERVE_FP8_DISPATCH="backend=triton,triton_max_m=16"):
  per-token quantization: a Triton kernel (one program per row), always;
  GEMM: torch._scaled_mm (cuBLASLt / CUTLASS row-wise) or the Triton FP8 kernel (split-K for
  small M), picked by M from the benchmark's measurements;
  block-wise: the Triton block kernel, or above block_dequant_min_m a dequantized bf16 weight +
  cuBLAS on the unquantized activations (more accurate; only where it measured faster).
A failing variant (a torch build without row-wise _scaled_mm for this dtype, a Triton compile
error) is logged once and the next one serves. Below sm_89 (no FP8 tensor cores) every call
dequantizes the weight to the activation dtype and matmuls.

Quantized values are rounded to e4m3 in float32 before the cast (ties to even), so the cast is
exact: the result is the same bit for bit on the GPU, in the interpreter (whose fp8 cast
rounds wrongly across binade boundaries) and in the CPU emulation, which the CPU engine uses.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._validate import require
from .quant_common import (
    apply_overrides,
    finish_split,
    interpret_dispatch,
    output_buffer,
    plan_split_k,
    run_with_fallback,
    split_setup,
    splitk_epilogue,
    use_triton,
)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE_AMAX = 1e-12  # an all-zero row gets a tiny scale, not a division by zero
NEVER = 10**9  # an M threshold no batch reaches


@dataclasses.dataclass
class Fp8Dispatch:
    backend: str = "scaled_mm"  # "scaled_mm" | "triton": the GEMM above triton_max_m
    triton_max_m: int = 0  # M <= this runs the Triton kernel whatever the backend
    use_fast_accum: bool = False  # _scaled_mm's fast accumulation (less exact over long K)
    block_dequant_min_m: int = NEVER  # block-wise: M >= this dequantizes + cuBLAS


FP8_DISPATCH = Fp8Dispatch()
apply_overrides(FP8_DISPATCH, os.environ.get("FASTSERVE_FP8_DISPATCH", ""), "FASTSERVE_FP8_DISPATCH")

# (largest M, config) of the Triton FP8 GEMMs.
FP8_CONFIGS: list[tuple[int, dict]] = [
    (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)),
    (64, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)),
    (1 << 62, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)),
]
FP8_BLOCK_CONFIGS: list[tuple[int, dict]] = [
    (16, dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)),
    (64, dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=4, num_warps=4, num_stages=4)),
    (1 << 62, dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)),
]


def set_fp8_dispatch(**settings) -> Fp8Dispatch:
    for name, value in settings.items():
        require(
            hasattr(FP8_DISPATCH, name),
            name,
            f"unknown dispatch setting; known: {[f.name for f in dataclasses.fields(FP8_DISPATCH)]}",
        )
        setattr(FP8_DISPATCH, name, value)
    return FP8_DISPATCH


def _bucket(configs, m: int) -> dict:
    for max_m, cfg in configs:
        if m <= max_m:
            return cfg
    return configs[-1][1]


_FP8_CAPABLE: dict[int, bool] = {}


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: sm_89 (Ada) and newer."""
    if device.type != "cuda":
        return interpret_dispatch()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _FP8_CAPABLE:
        _FP8_CAPABLE[idx] = torch.cuda.get_device_capability(idx) >= (8, 9)
    return _FP8_CAPABLE[idx]


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _round_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, as float32."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # Normal range: keep 3 mantissa bits; the integer add carries into the exponent.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormals are multiples of 2**-9: round a * 2**9 to an integer (1.5 * 2**23 trick).
    sub = ((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    r = tl.where(a >= 0.015625, normal, sub)
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize(x, scale):
    return _round_e4m3(tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0))


@triton.jit
def _per_token_quant_kernel(
    x_ptr,
    xq_ptr,
    scale_ptr,
    static_ptr,
    K,
    stride_x,
    stride_q,
    STATIC: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = xq_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        if ONE_PASS:
            xa = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(xa), axis=0)
        else:
            vmax = tl.zeros([BLOCK], tl.float32)
            for k0 in range(0, K, BLOCK):
                xb = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                vmax = tl.maximum(vmax, tl.abs(xb))
            amax = tl.max(vmax, axis=0)
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
        tl.store(scale_ptr + row, scale)
    if ONE_PASS:
        xa = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_row + offs, _quantize(xa, scale).to(xq_ptr.dtype.element_ty), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK):
            xb = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + offs, _quantize(xb, scale).to(xq_ptr.dtype.element_ty), mask=k0 + offs < K)


@triton.jit
def _group_quant_kernel(x_ptr, xq_ptr, s_ptr, K, GROUP, stride_x, stride_q, stride_s, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < GROUP) & (offs < K)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 448.0)
    tl.store(s_ptr + row * stride_s + g, scale)
    tl.store(xq_ptr + row * stride_q + offs, _quantize(x, scale).to(xq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_rows, (pid % width) // group_rows


@triton.jit(do_not_specialize=["M", "tiles_per_split", "num_splits"])
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    as_ptr,
    bs_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_om,
    tiles_per_split,
    num_tiles,
    num_splits,
    A_ROW: tl.constexpr,
    B_COL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FIXUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = (xq @ wq^T) * a_scale (per row or scalar) * b_scale (per column or scalar) + bias."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    # [BLOCK_K, BLOCK_N] view of the [N, K] weight: K-major, as FP8 wgmma wants its B.
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    for tile in range(t_start, t_end):
        k0 = tile * BLOCK_K
        kmask = k0 + offs_k < K
        a = tl.load(a_ptrs + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    if A_ROW:
        acc *= tl.load(as_ptr + offs_m, mask=mmask, other=0.0)[:, None]
    else:
        acc *= tl.load(as_ptr)
    if B_COL:
        acc *= tl.load(bs_ptr + offs_n, mask=nmask, other=0.0)[None, :]
    else:
        acc *= tl.load(bs_ptr)
    splitk_epilogue(
        acc,
        offs_m,
        offs_n,
        M,
        N,
        pid_k,
        num_splits,
        tl.program_id(0),
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
def _fp8_block_gemm_kernel(
    a_ptr,
    b_ptr,
    as_ptr,
    bs_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    K,
    SBN,
    SBK,
    stride_am,
    stride_bn,
    stride_asm,
    stride_bsn,
    stride_om,
    tiles_per_split,
    num_tiles,
    num_splits,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FIXUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Block-wise: every K tile lies in one scale block (SBK % BLOCK_K == 0); its dot is scaled
    by the activations' per-(row, K block) and the weight's per-(N block, K block) scales."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    as_row = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_row = bs_ptr + (offs_n // SBN).to(tl.int64) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    for tile in range(t_start, t_end):
        k0 = tile * BLOCK_K
        kb = k0 // SBK
        kmask = k0 + offs_k < K
        a = tl.load(a_ptrs + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=kmask[:, None] & nmask[None, :], other=0.0)
        a_s = tl.load(as_row + kb, mask=mmask, other=0.0)
        b_s = tl.load(bs_row + kb, mask=nmask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    splitk_epilogue(
        acc,
        offs_m,
        offs_n,
        M,
        N,
        pid_k,
        num_splits,
        tl.program_id(0),
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
def _fp8_block_dequant_kernel(
    w_ptr, s_ptr, out_ptr, N, K, SBN, SBK, stride_w, stride_s, stride_o, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + offs_k[None, :], mask=mask, other=0.0)
    s = tl.load(
        s_ptr + (offs_n // SBN).to(tl.int64)[:, None] * stride_s + (offs_k // SBK)[None, :], mask=mask, other=0.0
    )
    tl.store(
        out_ptr + offs_n.to(tl.int64)[:, None] * stride_o + offs_k[None, :],
        (w.to(tl.float32) * s).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


# ---------------------------------------------------------------- argument checks


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_act(x: torch.Tensor) -> None:
    require(
        x.dim() >= 1 and x.dtype in (torch.float16, torch.bfloat16, torch.float32),
        "x",
        f"must be float16, bfloat16 or float32 [..., K], got {x.dtype} {tuple(x.shape)}",
    )


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    require(
        weight.dtype == FP8_DTYPE and weight.dim() == 2,
        "weight",
        f"must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}",
    )
    n, k = weight.shape
    require(x.shape[-1] == k, "x", f"last dim {x.shape[-1]} must equal the weight's K = {k}")
    require(weight.device == x.device, "weight", f"is on {weight.device}, x on {x.device}")
    require(weight.stride(-1) == 1, "weight", "K (last dim) must be contiguous; call prepare_fp8_weight")
    return n, k


def _check_bias(bias, n: int, x: torch.Tensor) -> None:
    if bias is not None:
        require(bias.shape == (n,), "bias", f"must be [N={n}], got {tuple(bias.shape)}")
        require(bias.device == x.device, "bias", f"is on {bias.device}, x on {x.device}")


def _weight_scale(weight_scale: torch.Tensor, n: int) -> torch.Tensor:
    require(
        isinstance(weight_scale, torch.Tensor) and weight_scale.is_floating_point(),
        "weight_scale",
        "must be a float tensor",
    )
    require(
        weight_scale.numel() in (1, n),
        "weight_scale",
        f"must hold 1 (per tensor) or N={n} (per channel) values, got shape {tuple(weight_scale.shape)}",
    )
    return weight_scale.reshape(-1).float()


def prepare_fp8_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Once at load: the [N, K] weight K-contiguous and its scale float32 [1] or [N]."""
    require(
        weight.dtype == FP8_DTYPE and weight.dim() == 2,
        "weight",
        f"must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}",
    )
    return weight.contiguous(), _weight_scale(weight_scale, weight.shape[0]).contiguous()


# ---------------------------------------------------------------- torch path (CPU; emulates the GPU)


def _per_token_quant_torch(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x2.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE_AMAX) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _static_quant_torch(x2: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    return (x2.float() / input_scale.float().reshape(1, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _group_quant_torch(x2: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x2.shape
    g = -(-k // group)
    xf = F.pad(x2.float(), (0, g * group - k)).view(m, g, group)
    scale = xf.abs().amax(dim=-1).clamp_min(MIN_SCALE_AMAX) / FP8_MAX
    xq = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, g * group)[:, :k]
    return xq.contiguous(), scale


def _fp8_linear_torch(x2, weight, ws, input_scale, bias, out_dtype):
    if input_scale is None:
        xq, xs = _per_token_quant_torch(x2)
    else:
        xq, xs = _static_quant_torch(x2, input_scale), input_scale.float().reshape(1, 1)
    y = (xq.float() @ weight.float().t()) * xs * ws.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _block_scales_full(weight_scale_inv: torch.Tensor, n: int, k: int, bn: int, bk: int) -> torch.Tensor:
    return weight_scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def _fp8_block_linear_torch(x2, weight, weight_scale_inv, bn, bk, bias, out_dtype):
    n, k = weight.shape
    xq, xs = _group_quant_torch(x2, bk)
    x_deq = xq.float() * xs.repeat_interleave(bk, dim=1)[:, :k]
    w_deq = weight.float() * _block_scales_full(weight_scale_inv, n, k, bn, bk)
    y = x_deq @ w_deq.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _dequant_linear(x2, weight, ws, bias, out_dtype):
    """sm < 89 and last-resort path: the weight dequantized to x's dtype, no activation quant."""
    w = (weight.to(torch.float32) * ws.reshape(-1, 1)).to(x2.dtype)
    return F.linear(x2, w, bias.to(x2.dtype) if bias is not None else None).to(out_dtype)


# ---------------------------------------------------------------- launchers (CUDA or interpreter)


def per_token_quant_fp8_triton(x2: torch.Tensor, input_scale: torch.Tensor | None = None):
    m, k = x2.shape
    xq = torch.empty(m, k, dtype=FP8_DTYPE, device=x2.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x2.device)
    if m == 0:
        return xq, scale
    block = min(triton.next_power_of_2(max(k, 16)), 8192)
    _per_token_quant_kernel[(m,)](
        x2,
        xq,
        scale,
        input_scale if input_scale is not None else scale,
        k,
        x2.stride(0),
        xq.stride(0),
        STATIC=input_scale is not None,
        ONE_PASS=k <= block,
        BLOCK=block,
        num_warps=4 if block <= 2048 else 8,
    )
    return xq, scale


def per_token_group_quant_fp8_triton(x2: torch.Tensor, group: int):
    m, k = x2.shape
    g = triton.cdiv(k, group)
    xq = torch.empty(m, k, dtype=FP8_DTYPE, device=x2.device)
    scale = torch.empty(m, g, dtype=torch.float32, device=x2.device)
    if m == 0:
        return xq, scale
    block = triton.next_power_of_2(group)
    _group_quant_kernel[(m, g)](
        x2,
        xq,
        scale,
        k,
        group,
        x2.stride(0),
        xq.stride(0),
        scale.stride(0),
        BLOCK=block,
        num_warps=1 if block <= 256 else 4,
    )
    return xq, scale


def _split_for(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, device, cfg) -> tuple[int, int, int]:
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    num_tiles = triton.cdiv(k, block_k)
    max_split = max(1, min(16, (n * k) // max(1, 2 * m * n * 4)))  # partials under half the weight bytes
    split, per = plan_split_k(
        programs,
        num_tiles,
        device,
        waves=cfg.get("waves", 2.0),
        min_tiles=cfg.get("min_tiles", 2),
        max_split=max_split,
        split=cfg.get("split"),
    )
    return split, per, num_tiles


def fp8_gemm_triton(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """xq fp8 [M, K], x_scale float32 [M, 1] or [1]; weight fp8 [N, K], ws float32 [N] or [1]."""
    m, k = xq.shape
    n = weight.shape[0]
    cfg = dict(_bucket(FP8_CONFIGS, m), **(config or {}))
    block_m = min(int(cfg["BLOCK_M"]), max(16, triton.next_power_of_2(m)))
    block_n = min(int(cfg["BLOCK_N"]), max(16, triton.next_power_of_2(n)))
    block_k = min(int(cfg["BLOCK_K"]), max(32, triton.next_power_of_2(k)))
    split, per, num_tiles = _split_for(m, n, k, block_m, block_n, block_k, xq.device, cfg)
    out = output_buffer(out, m, n, out_dtype, xq.device)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    part, counters, fixup = split_setup(split, programs, m, n, out, cfg.get("fixup"))
    _fp8_gemm_kernel[(programs, split)](
        xq,
        weight,
        x_scale,
        ws,
        bias if bias is not None else out,
        out,
        part,
        counters,
        m,
        n,
        k,
        xq.stride(0),
        weight.stride(0),
        out.stride(0),
        per,
        num_tiles,
        split,
        A_ROW=x_scale.numel() != 1,
        B_COL=ws.numel() != 1,
        HAS_BIAS=bias is not None,
        SPLIT=split > 1,
        FIXUP=fixup,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=int(cfg["GROUP_M"]),
        num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]),
    )
    return finish_split(part, bias, out, fixup)


def fp8_block_gemm_triton(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: tuple[int, int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """xq fp8 [M, K] with x_scale [M, ceil(K / bk)]; weight fp8 [N, K] with weight_scale_inv
    [ceil(N / bn), ceil(K / bk)]."""
    m, k = xq.shape
    n = weight.shape[0]
    bn, bk = block_size
    cfg = dict(_bucket(FP8_BLOCK_CONFIGS, m), **(config or {}))
    block_k = min(128, bk & -bk)  # a power of two dividing bk: every tile inside one scale block
    require(block_k >= 16, "block_size", f"K block {bk} needs a power-of-two divisor >= 16 for the FP8 kernel")
    block_m = min(int(cfg["BLOCK_M"]), max(16, triton.next_power_of_2(m)))
    block_n = min(int(cfg["BLOCK_N"]), max(16, triton.next_power_of_2(n)))
    split, per, num_tiles = _split_for(m, n, k, block_m, block_n, block_k, xq.device, cfg)
    out = output_buffer(out, m, n, out_dtype, xq.device)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    part, counters, fixup = split_setup(split, programs, m, n, out, cfg.get("fixup"))
    _fp8_block_gemm_kernel[(programs, split)](
        xq,
        weight,
        x_scale,
        weight_scale_inv,
        bias if bias is not None else out,
        out,
        part,
        counters,
        m,
        n,
        k,
        bn,
        bk,
        xq.stride(0),
        weight.stride(0),
        x_scale.stride(0),
        weight_scale_inv.stride(0),
        out.stride(0),
        per,
        num_tiles,
        split,
        HAS_BIAS=bias is not None,
        SPLIT=split > 1,
        FIXUP=fixup,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=int(cfg["GROUP_M"]),
        num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]),
    )
    return finish_split(part, bias, out, fixup)


def fp8_block_dequant_triton(
    weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    bn_, bk_ = 64, 128
    _fp8_block_dequant_kernel[(triton.cdiv(n, bn_), triton.cdiv(k, bk_))](
        weight,
        weight_scale_inv,
        out,
        n,
        k,
        block_size[0],
        block_size[1],
        weight.stride(0),
        weight_scale_inv.stride(0),
        out.stride(0),
        BLOCK_N=bn_,
        BLOCK_K=bk_,
        num_warps=4,
    )
    return out


def scaled_mm_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """torch._scaled_mm: tensor-wise scales when both are scalars, else row-wise ([M, 1] x [1, N])."""
    m = xq.shape[0]
    n = weight.shape[0]
    if x_scale.numel() == 1 and ws.numel() == 1:
        y = torch._scaled_mm(
            xq,
            weight.t(),
            scale_a=x_scale.reshape(()),
            scale_b=ws.reshape(()),
            bias=bias.to(out_dtype) if bias is not None else None,
            out_dtype=out_dtype,
            use_fast_accum=use_fast_accum,
        )
        return y
    sa = x_scale.reshape(-1, 1) if x_scale.numel() == m else x_scale.reshape(1, 1).expand(m, 1).contiguous()
    sb = ws.reshape(1, -1) if ws.numel() == n else ws.reshape(1, 1).expand(1, n).contiguous()
    y = torch._scaled_mm(xq, weight.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=use_fast_accum)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y


# ---------------------------------------------------------------- entry points


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: x [M, K] -> (xq float8_e4m3fn [M, K], scale float32 [M, 1])
    with scale = max(|x_row|) / 448 and xq = round(x / scale)."""
    _check_act(x)
    require(x.dim() == 2, "x", f"must be [M, K], got {tuple(x.shape)}")
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    if not use_triton(x2):
        return _per_token_quant_torch(x2)
    return per_token_quant_fp8_triton(x2)


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and per group_size columns: (xq fp8 [M, K], scale float32 [M, ceil(K / group_size)])."""
    _check_act(x)
    require(x.dim() == 2, "x", f"must be [M, K], got {tuple(x.shape)}")
    require(isinstance(group_size, int) and group_size > 0, "group_size", f"must be a positive int, got {group_size}")
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    if not use_triton(x2):
        return _group_quant_torch(x2, group_size)
    return per_token_group_quant_fp8_triton(x2, group_size)


def choose_fp8_backend(m: int) -> str:
    d = FP8_DISPATCH
    return "triton" if m <= d.triton_max_m or d.backend == "triton" else "scaled_mm"


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y [..., N] = quant(x) @ weight^T * scales (+ bias) in out_dtype (default x's dtype).

    weight float8_e4m3fn [N, K]; weight_scale float32 [1] / [N] / [N, 1]; input_scale None
    (dynamic per-token activation scales) or [1] (static per-tensor)."""
    _check_act(x)
    n, k = _check_weight(x, weight)
    ws = _weight_scale(weight_scale, n)
    if input_scale is not None:
        require(
            isinstance(input_scale, torch.Tensor) and input_scale.numel() == 1,
            "input_scale",
            f"must be a 1-element tensor (static per-tensor scale), got {getattr(input_scale, 'shape', input_scale)}",
        )
        input_scale = input_scale.reshape(1).float()
    _check_bias(bias, n, x)
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = _rows(x)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n, dtype=out_dtype)
    if not use_triton(x2):
        return _fp8_linear_torch(x2, weight, ws, input_scale, bias, out_dtype).view(*lead, n)
    if not fp8_supported(x2.device):
        return _dequant_linear(x2, weight, ws, bias, out_dtype).view(*lead, n)

    def quant():
        if input_scale is None:
            return per_token_quant_fp8_triton(x2)
        return per_token_quant_fp8_triton(x2, input_scale)[0], input_scale

    def triton_gemm():
        xq, xs = quant()
        return fp8_gemm_triton(xq, xs, weight, ws, bias, out_dtype)

    def safe():
        return run_with_fallback(
            f"fp8_triton/{out_dtype}", triton_gemm, lambda: _dequant_linear(x2, weight, ws, bias, out_dtype)
        )

    if choose_fp8_backend(m) == "triton":
        y = safe()
    else:

        def scaled():
            xq, xs = quant()
            return scaled_mm_linear(xq, xs, weight, ws, bias, out_dtype, FP8_DISPATCH.use_fast_accum)

        kind = "tensorwise" if input_scale is not None and ws.numel() == 1 else "rowwise"
        y = run_with_fallback(f"scaled_mm/{kind}/{out_dtype}", scaled, safe)
    return y.view(*lead, n)


def _check_block(x, weight, weight_scale_inv, block_size) -> tuple[int, int, int, int]:
    n, k = _check_weight(x, weight)
    require(
        len(tuple(block_size)) == 2 and all(isinstance(b, int) and b > 0 for b in block_size),
        "block_size",
        f"must be two positive ints (block_n, block_k), got {block_size}",
    )
    bn, bk = block_size
    shape = (-(-n // bn), -(-k // bk))
    require(
        isinstance(weight_scale_inv, torch.Tensor)
        and tuple(weight_scale_inv.shape) == shape
        and weight_scale_inv.dtype == torch.float32,
        "weight_scale_inv",
        f"must be float32 {list(shape)} for weight {tuple(weight.shape)} and block {tuple(block_size)}, got "
        f"{getattr(weight_scale_inv, 'dtype', None)} {tuple(getattr(weight_scale_inv, 'shape', ()))}",
    )
    require(
        weight_scale_inv.device == x.device, "weight_scale_inv", f"is on {weight_scale_inv.device}, x on {x.device}"
    )
    require(weight_scale_inv.stride(-1) == 1, "weight_scale_inv", "last dimension must be contiguous")
    return n, k, bn, bk


def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: tuple[int, int],
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Block-wise FP8: y [..., N] = sum over K blocks of (xq_b @ wq_b^T) * x_scale * w_scale.

    weight float8_e4m3fn [N, K]; weight_scale_inv float32 [ceil(N/bn), ceil(K/bk)] (a dequant
    multiplier); activations quantized per token and per bk columns."""
    _check_act(x)
    n, k, bn, bk = _check_block(x, weight, weight_scale_inv, block_size)
    _check_bias(bias, n, x)
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = _rows(x)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n, dtype=out_dtype)
    if not use_triton(x2):
        return _fp8_block_linear_torch(x2, weight, weight_scale_inv, bn, bk, bias, out_dtype).view(*lead, n)

    def dequant_torch():
        w = (weight.float() * _block_scales_full(weight_scale_inv, n, k, bn, bk)).to(x2.dtype)
        return F.linear(x2, w, bias.to(x2.dtype) if bias is not None else None).to(out_dtype)

    def dequant():
        w = fp8_block_dequant_triton(weight, weight_scale_inv, (bn, bk), x2.dtype)
        return F.linear(x2, w, bias.to(x2.dtype) if bias is not None else None).to(out_dtype)

    def deq_path():
        return run_with_fallback(f"fp8_block_dequant/{x2.dtype}", dequant, dequant_torch)

    if not fp8_supported(x2.device) or m >= FP8_DISPATCH.block_dequant_min_m or (bk & -bk) < 16:
        return deq_path().view(*lead, n)

    def block():
        xq, xs = per_token_group_quant_fp8_triton(x2, bk)
        return fp8_block_gemm_triton(xq, xs, weight, weight_scale_inv, (bn, bk), bias, out_dtype)

    return run_with_fallback(f"fp8_block/{out_dtype}", block, deq_path).view(*lead, n)


# ---------------------------------------------------------------- warm-up (engine start)


def warmup_row_counts(max_m: int) -> list[int]:
    """One M per (backend, config bucket, block-wise path) the dispatcher can pick up to max_m."""
    d = FP8_DISPATCH
    ms = {1, 16, 17, 64, 65, max_m, max(1, d.triton_max_m), d.triton_max_m + 1}
    if d.block_dequant_min_m <= max_m:
        ms.update({d.block_dequant_min_m - 1, d.block_dequant_min_m})
    return sorted(m for m in ms if 1 <= m <= max_m)


def warmup(
    shapes: Iterable[tuple],
    dtype: torch.dtype = torch.bfloat16,
    max_m: int = 256,
    block_size: tuple[int, int] | None = None,
    per_channel: bool = True,
    static_input: bool = False,
    device: str | torch.device = "cuda",
) -> dict:
    """Compile every FP8 variant the dispatcher can choose for these (K, N[, has_bias]) layer
    shapes up to max_m rows (block_size: the block-wise kernels instead)."""
    t0 = time.perf_counter()
    ms = warmup_row_counts(max_m)
    for shape in shapes:
        k, n = int(shape[0]), int(shape[1])
        bias = torch.randn(n, dtype=dtype, device=device) if len(shape) > 2 and shape[2] else None
        w = (torch.randn(n, k, device=device) * 0.1).to(FP8_DTYPE)
        if block_size is not None:
            s = torch.rand(-(-n // block_size[0]), -(-k // block_size[1]), device=device) * 0.01 + 1e-3
        else:
            s = torch.rand(n if per_channel else 1, device=device) * 0.01 + 1e-3
        inp = torch.tensor([0.05], device=device) if static_input else None
        for m in ms:
            x = torch.randn(m, k, dtype=dtype, device=device)
            if block_size is not None:
                fp8_block_linear(x, w, s, block_size, bias)
            else:
                fp8_linear(x, w, s, inp, bias)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0}
