"""Compiling the quantized GEMMs at engine start, before the first request.

Triton compiles a kernel variant the first time the dispatcher picks it (GEMV, each tile
bucket of the fused kernel, split-K or not, bias or not, the dequantize path): about a second
each. Without this, the first requests pay those seconds: a batch-1 AWQ run measured 2.19 s for
256 tokens when its kernels compiled during the run, against 1.13 s for the same kernels
already compiled (H100, bench/results/quant-e2e-batch1-*-h100.json). CUDA graph capture
compiles only the decode row counts; prefill chunks of every size still reach the others.

Each distinct quantized layer (same method, buffer shapes and bias) runs once at every row
count where a kernel's dispatch changes, through its own `quant_method.apply`: the real
weights, no collective (row-parallel layers reduce outside apply), output discarded. Compiled
kernels are cached on disk by Triton, so a second start pays only the launches."""

from __future__ import annotations

import time

import torch
from torch import nn

from fastserve.kernels import quant_fp8, quant_gemm


def _signature(module: nn.Module) -> tuple:
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers(recurse=False))
    return (type(module.quant_method).__name__, module.input_size, module.bias is not None, buffers)


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """One module per distinct quantized layer signature, in model order."""
    seen: dict[tuple, nn.Module] = {}
    for module in model.modules():
        if getattr(module, "quant_method", None) is None or not hasattr(module, "input_size"):
            continue
        seen.setdefault(_signature(module), module)
    return list(seen.values())


def warmup_row_counts(max_m: int) -> list[int]:
    return sorted(set(quant_gemm.warmup_row_counts(max_m)) | set(quant_fp8.warmup_row_counts(max_m)))


@torch.inference_mode()
def warm_up_quantized(model: nn.Module, max_m: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Run every distinct quantized layer at each dispatch row count up to max_m.

    Returns {"layers": distinct layers, "row_counts": [...], "seconds": ...}; nothing to do
    (an unquantized model) returns at once with layers 0."""
    t0 = time.perf_counter()
    layers = quantized_layers(model)
    ms = warmup_row_counts(max_m) if layers else []
    generator = torch.Generator(device=device).manual_seed(0)
    for module in layers:
        for m in ms:
            x = torch.randn(m, module.input_size, dtype=dtype, device=device, generator=generator)
            module.quant_method.apply(module, x, module.bias)
    if layers and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return {"layers": len(layers), "row_counts": ms, "seconds": time.perf_counter() - t0}
