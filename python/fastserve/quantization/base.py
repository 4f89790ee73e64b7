"""The contract between a quantization format and the linear layers (layers/linear.py).

A `QuantConfig` is parsed once from the checkpoint's config; each linear layer asks it
`get_linear_method(layer, prefix)` for the `LinearMethod` of that module (None: the module is
not quantized, e.g. `modules_to_not_convert`, compressed-tensors `ignore`, GPTQ `-:` overrides).
The method then
- `create_weights(layer)`: registers the checkpoint's tensors for this rank as parameters, each
  tagged with how the layer's `weight_loader` cuts its slice (see `make_param`);
- `process_weights_after_loading(layer)`: converts them ONCE into the kernel's layout
  (kernels/quant_gemm.py, kernels/quant_fp8.py), replacing the parameters by buffers;
- `apply(layer, x, bias)`: the matmul.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch
from torch import nn


class LinearMethod(Protocol):
    def create_weights(self, layer) -> None: ...

    def process_weights_after_loading(self, layer) -> None: ...

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def init_dummy(self, layer, generator: torch.Generator) -> None: ...


class QuantConfig:
    """Base of the per-format configs. `name` is the vLLM name (--quantization)."""

    name: str = ""

    def get_linear_method(self, layer, prefix: str) -> LinearMethod | None:
        raise NotImplementedError

    def describe(self) -> str:
        """For the load log, e.g. 'awq int4, group 128'."""
        return self.name

    def tp_requirements(self, prefix: str, kind: str) -> tuple[int, int]:
        """(multiple N per rank must be, multiple K per rank must be) for the module `prefix`
        split as `kind` ("column" or "row"); (1, 1) when the module is not quantized."""
        return 1, 1


def make_param(
    layer: nn.Module,
    name: str,
    shape,
    dtype: torch.dtype,
    *,
    output_dim: int | None = None,
    input_dim: int | None = None,
    pack_out: int = 1,
    shard_scalar: bool = False,
    optional: bool = False,
) -> nn.Parameter:
    """Register a checkpoint tensor on `layer`.

    output_dim / input_dim: the tensor dimension that runs along N / K (None: not split in that
    direction, every rank loads it whole); pack_out: N units per element along output_dim (8 for
    N-packed int4 words, the block size of block scales), so fused shards land at
    offset / pack_out; shard_scalar: one value per fused shard (FP8 per-tensor scales);
    optional: the checkpoint may leave it out (g_idx, AWQ zeros without zero_point)."""
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.output_dim, p.input_dim, p.pack_out = output_dim, input_dim, pack_out
    p.shard_scalar, p.optional, p.loaded = shard_scalar, optional, False
    p.weight_loader = layer.weight_loader
    layer.register_parameter(name, p)
    return p


def replace_with_buffers(layer: nn.Module, drop: list[str], **buffers: torch.Tensor | None) -> None:
    """Swap checkpoint parameters for the kernel-layout tensors (buffers: never loaded again)."""
    for name in drop:
        if name in layer._parameters:
            del layer._parameters[name]
    for name, t in buffers.items():
        if name in layer._parameters:
            del layer._parameters[name]
        layer.register_buffer(name, None if t is None else t.contiguous())


def loaded(layer: nn.Module, name: str) -> bool:
    p = layer._parameters.get(name)
    return p is not None and bool(getattr(p, "loaded", False))


# Fused layers are named after the fused module; checkpoints (and their skip lists) name the parts.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_names(prefix: str) -> list[str]:
    """The checkpoint module names a layer of ours stands for."""
    head, _, last = prefix.rpartition(".")
    parts = FUSED_PARTS.get(last)
    if parts is None:
        return [prefix]
    return [f"{head}.{p}" if head else p for p in parts]


def matches_module_list(prefix: str, modules: list[str] | None) -> bool:
    """AWQ `modules_to_not_convert` / compressed-tensors `ignore`: exact names, `re:` regexes, or
    (AWQ) substrings of the module name."""
    if not modules:
        return False
    for name in checkpoint_names(prefix):
        for m in modules:
            if m.startswith("re:"):
                if re.match(m[3:], name):
                    return True
            elif name == m or m in name.split(".") or name.endswith("." + m) or m in name:
                return True
    return False


def one_answer(prefix: str, answers: list, what: str):
    """All parts of a fused layer must be quantized alike; the answer they share."""
    first = answers[0]
    if any(a != first for a in answers[1:]):
        raise ValueError(
            f"{prefix}: the fused parts {checkpoint_names(prefix)} have different {what} "
            f"({answers}); fastserve fuses them into one matmul, so they must agree"
        )
    return first


def int_tp_check(kind: str, pack_n: int, gs: int | None, act_order: bool, bits: int) -> tuple[int, int]:
    """(N multiple, K multiple) per rank for an int weight packed along N by pack_n with group
    size gs (None / -1: one group, replicated)."""
    pack_k = 32 // bits
    if kind == "row":
        k_mult = pack_k if (act_order or gs in (None, -1)) else max(gs, pack_k)
        return 1, k_mult
    return pack_n, 1
