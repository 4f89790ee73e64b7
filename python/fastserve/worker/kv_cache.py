"""KV-cache sizing and allocation.

Layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = K, 1 = V), the
layout the Triton kernels and the torch fallback read through the block tables."""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger("fastserve")

_GIB = 1 << 30
# vLLM's names. "fp8" is e4m3 (3 mantissa bits, range +-448) as on vLLM's CUDA backends; e5m2
# trades a mantissa bit for range (+-57344). Values are stored divided by the layer's scale (the
# checkpoint's k_scale / v_scale, else 1.0 as in vLLM), saturated at the range.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def resolve_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in _FP8:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (got {kv_cache_dtype!r})")
    return _FP8[kv_cache_dtype]


# vLLM's CPU backend reads VLLM_CPU_KVCACHE_SPACE (GiB) with a 4 GiB default.
DEFAULT_CPU_KV_SPACE_GB = 4.0


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def cpu_num_blocks(block_bytes: int, space_gb: float | None) -> int:
    space = (DEFAULT_CPU_KV_SPACE_GB if space_gb is None else space_gb) * _GIB
    return max(1, int(space // block_bytes))


def gpu_num_blocks(block_bytes: int, gpu_memory_utilization: float, peak_bytes: int, device: torch.device) -> int:
    """Blocks that fit under gpu_memory_utilization once the profiled peak (weights +
    activations of the largest step + memory outside torch's allocator) is taken off."""
    free, total = torch.cuda.mem_get_info(device)
    non_torch = (total - free) - torch.cuda.memory_reserved(device)
    budget = total * gpu_memory_utilization - peak_bytes - max(0, non_torch)
    if budget < block_bytes:
        raise ValueError(
            f"no memory left for the KV cache: the model and its largest step take "
            f"{(peak_bytes + max(0, non_torch)) / _GIB:.2f} GiB of {total / _GIB:.2f} GiB and "
            f"gpu_memory_utilization={gpu_memory_utilization} allows {total * gpu_memory_utilization / _GIB:.2f} GiB: "
            "raise --gpu-memory-utilization, lower --max-num-batched-tokens, or use a GPU with more memory"
        )
    return int(budget // block_bytes)


def check_fits(num_blocks: int, block_size: int, max_model_len: int) -> None:
    needed = math.ceil(max_model_len / block_size)
    if num_blocks < needed:
        raise ValueError(
            f"KV cache too small for max_model_len={max_model_len}: it holds {num_blocks * block_size} tokens "
            f"({num_blocks} blocks of {block_size}) but one sequence needs {needed * block_size}: lower "
            "--max-model-len or raise --gpu-memory-utilization"
        )


def allocate(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    return [
        torch.empty(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        for _ in range(num_layers)
    ]
