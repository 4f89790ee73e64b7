"""Independent quantize + pack for tests, written from the formats' formulas (not from
fastserve.quantization): each function takes an HF float32 weight [N, K] and returns the
checkpoint tensors under their real names, plus the dequantized weight the reference model
(HF transformers, loaded with load_state_dict) runs with.

    tensors, w_deq = gptq_quantize(w, bits=4, group_size=16, sym=False, g_idx=..., v1=True)
    write_quantized_checkpoint(src_dir, dst_dir, quantize_fn, quantization_config)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _words(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """Pack the last dim of unsigned ints, `32 // bits` per word: nibble i takes value
    order[i] of its group (sequential by default); int32 with the word's bits."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(*values.shape[:-1], values.shape[-1] // per, per)
    order = order or list(range(per))
    word = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i in range(per):
        word += v[..., order[i]] * (2 ** (bits * i))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _minmax_quant(wg: torch.Tensor, bits: int, sym: bool, scale_dtype):
    """GPTQ / AWQ style per-row asymmetric or symmetric quantization of wg [rows, cols]:
    (q [rows, cols] unsigned, scale [rows], zero [rows]) with W ~ (q - zero) * scale."""
    maxq = 2**bits - 1
    if sym:
        xmax = wg.abs().amax(dim=1).clamp_min(1e-8)
        scale = (2 * xmax / maxq).to(scale_dtype).float()
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        xmin, xmax = wg.amin(dim=1).clamp(max=0), wg.amax(dim=1).clamp(min=0)
        scale = ((xmax - xmin).clamp_min(1e-8) / maxq).to(scale_dtype).float()
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(wg / scale[:, None]) + zero[:, None], 0, maxq)
    return q, scale, zero


def gptq_quantize(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor | None = None, v1: bool = True
):
    """GPTQ tensors for w [N, K]: qweight [K/pack, N] (K-packed), qzeros [G, N/pack] (N-packed,
    v1 stores zero - 1), scales [G, N] fp16, g_idx [K]."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    groups = k // gs
    if g_idx is None:
        g_idx = torch.arange(k) // gs
    q = torch.zeros(n, k)
    scales, zeros = torch.zeros(groups, n), torch.zeros(groups, n)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        qg, s, z = _minmax_quant(w[:, cols], bits, sym, torch.float16)
        q[:, cols], scales[g], zeros[g] = qg, s, z
    mask = 2**bits - 1
    stored_z = ((zeros.to(torch.int64) - 1) & mask) if v1 else zeros.to(torch.int64)
    decoded_z = stored_z + 1 if v1 else stored_z  # what the format's readers compute (v1 zero 0 -> 16)
    w_deq = (q - decoded_z[g_idx].t()) * scales[g_idx].t()
    tensors = {
        "qweight": _words(q, bits).t().contiguous(),
        "qzeros": _words(stored_z, bits),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, w_deq


def awq_quantize(w: torch.Tensor, group_size: int, zero_point: bool = True, scale_dtype=torch.float16):
    """AutoAWQ GEMM tensors for w [N, K]: qweight [K, N/8], qzeros [G, N/8] in AWQ nibble order,
    scales [G, N]."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    wt = w.t()  # [K, N]: AWQ stores [in, out]
    q = torch.zeros(k, n)
    scales, zeros = torch.zeros(k // gs, n), torch.zeros(k // gs, n)
    for g in range(k // gs):
        rows = slice(g * gs, (g + 1) * gs)
        qg, s, z = _minmax_quant(wt[rows].t(), 4, not zero_point, scale_dtype)
        q[rows], scales[g], zeros[g] = qg.t(), s, z
    w_deq = ((q - zeros.repeat_interleave(gs, 0)) * scales.repeat_interleave(gs, 0)).t()
    tensors = {"qweight": _words(q, 4, AWQ_ORDER), "scales": scales.to(scale_dtype)}
    if zero_point:
        tensors["qzeros"] = _words(zeros, 4, AWQ_ORDER)
    return tensors, w_deq


def ct_pack_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, g_idx=None):
    """compressed-tensors pack-quantized tensors for w [N, K]: weight_packed [N, K/pack] (values
    q + 2**(bits-1), signed q), weight_scale [N, G], weight_zero_point [N/pack, G] (asym),
    weight_shape, weight_g_idx (act order)."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    groups = k // gs
    g_idx_eff = torch.arange(k) // gs if g_idx is None else g_idx
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.zeros(n, k)
    scale, zp = torch.zeros(n, groups), torch.zeros(n, groups)
    for g in range(groups):
        cols = (g_idx_eff == g).nonzero().flatten()
        wg = w[:, cols]
        if symmetric:
            s = (wg.abs().amax(dim=1) / ((qmax - qmin) / 2)).clamp_min(1e-8).to(torch.bfloat16).float()
            z = torch.zeros(n)
        else:
            lo, hi = wg.amin(dim=1).clamp(max=0), wg.amax(dim=1).clamp(min=0)
            s = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8).to(torch.bfloat16).float()
            z = torch.round(qmin - lo / s).clamp(qmin, qmax)
        q[:, cols] = torch.clamp(torch.round(wg / s[:, None]) + z[:, None], qmin, qmax)
        scale[:, g], zp[:, g] = s, z
    w_deq = (q - zp[:, g_idx_eff]) * scale[:, g_idx_eff]
    off = 2 ** (bits - 1)
    tensors = {
        "weight_packed": _words(q + off, bits),
        "weight_scale": scale.to(torch.bfloat16),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not symmetric:
        tensors["weight_zero_point"] = _words((zp + off).t().contiguous(), bits).t().contiguous()
    if g_idx is not None:
        tensors["weight_g_idx"] = g_idx.to(torch.int32)
    return tensors, w_deq


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_quantize(w: torch.Tensor, strategy: str, block: tuple[int, int] | None = None):
    """(weight fp8 [N, K], scale, w_deq): per tensor (scalar scale), per channel ([N, 1]) or
    per block ([N/bn, K/bk], weight_scale_inv)."""
    if strategy == "tensor":
        s = w.abs().amax() / FP8_MAX
        wq = fp8_round(w / s)
        return wq, s.reshape(()), wq.float() * s
    if strategy == "channel":
        s = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        wq = fp8_round(w / s)
        return wq, s, wq.float() * s
    bn, bk = block
    n, k = w.shape
    blocks = w.reshape(n // bn, bn, k // bk, bk)
    s = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [N/bn, K/bk]
    full = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    wq = fp8_round(w / full)
    return wq, s, wq.float() * full


def fake_quant_tokens(x: torch.Tensor, input_scale: float | None = None, group: int | None = None) -> torch.Tensor:
    """What a W8A8 matmul does to its input: per-token (or per token and `group` columns)
    dynamic fp8 scales, or one static scale."""
    xf = x.float()
    if input_scale is not None:
        return fp8_round(xf / input_scale).float() * input_scale
    if group is not None:
        g = xf.reshape(*xf.shape[:-1], xf.shape[-1] // group, group)
        s = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
        return (fp8_round(g / s).float() * s).reshape(xf.shape)
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return fp8_round(xf / s).float() * s


def linear_names(state: dict) -> list[str]:
    """Module names (without .weight) of the decoder's quantizable linears."""
    return [k[: -len(".weight")] for k in state if re.search(r"\.(%s)\.weight$" % "|".join(LINEARS), k)]


def write_checkpoint(
    src: Path, dst: Path, tensors: dict, quantization_config: dict | None, config_file: str = "config.json"
) -> Path:
    """Copy src's config and tokenizer files to dst, write `tensors` as model.safetensors and the
    quantization config into config.json (or a side file such as quantize_config.json)."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    if quantization_config is not None:
        if config_file == "config.json":
            cfg = json.loads((dst / "config.json").read_text())
            cfg["quantization_config"] = quantization_config
            (dst / "config.json").write_text(json.dumps(cfg, indent=1))
        else:
            (dst / config_file).write_text(json.dumps(quantization_config, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst
