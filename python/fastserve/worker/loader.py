"""Build a model on its device and fill its weights.

load_format (vLLM's names):
- "auto": safetensors when the directory has any (sharded via model.safetensors.index.json
  or every *.safetensors), else PyTorch `pytorch_model*.bin` read with
  torch.load(weights_only=True) so a checkpoint cannot run code.
- "safetensors" / "pt": only that format.
- "gguf" (or "auto" on a .gguf file): a llama.cpp GGUF file, dequantized at load (gguf_loader.py).
- "dummy": seeded random weights made directly on the target device (benchmarks, tests):
  matrices uniform in [-0.02, 0.02], biases in [-0.002, 0.002], norm weights 1, so
  activations stay finite and logits are not all equal. With a quantization, quantized layers
  get random tensors in the checkpoint's own layout (their method's `init_dummy`), then the
  same conversion a real checkpoint gets, so a benchmark runs the real quantized kernels.

After loading, every quantized linear layer converts its tensors into the kernel's layout once
(`process_weights_after_loading`).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fastserve.config import ModelConfig
from fastserve.models.registry import get_model_class

LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")


def _indexed_files(model_dir: str, index_name: str) -> list[str] | None:
    path = os.path.join(model_dir, index_name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]


def safetensors_files(model_dir: str) -> list[str]:
    return _indexed_files(model_dir, "model.safetensors.index.json") or sorted(
        glob.glob(os.path.join(model_dir, "*.safetensors"))
    )


def pt_files(model_dir: str) -> list[str]:
    return _indexed_files(model_dir, "pytorch_model.bin.index.json") or sorted(
        glob.glob(os.path.join(model_dir, "pytorch_model*.bin"))
    )


def iterate_weights(model_dir: str, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) for every tensor in the checkpoint, one file open at a time."""
    from fastserve.gguf_loader import is_gguf, iterate_gguf_weights

    if is_gguf(model_dir) and load_format in ("auto", "gguf"):
        yield from iterate_gguf_weights(model_dir)
        return
    if load_format == "gguf":
        raise ValueError(f"load_format='gguf' needs a .gguf file, got {model_dir!r}")
    if load_format not in ("auto", "safetensors", "pt", "gguf"):
        raise ValueError(f"load_format {load_format!r} has no weight files: use one of {LOAD_FORMATS}")
    st = safetensors_files(model_dir) if load_format in ("auto", "safetensors") else []
    pt = pt_files(model_dir) if load_format in ("auto", "pt") and not st else []
    if not st and not pt:
        raise ValueError(
            f"no weights found in {model_dir!r} for load_format={load_format!r}: expected *.safetensors or "
            f"pytorch_model*.bin (or pass load_format='dummy' for random weights)"
        )
    if st:
        from safetensors import safe_open

        for path in st:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    else:
        for path in pt:
            # weights_only: a pickle from an untrusted checkpoint must not execute code;
            # mmap keeps peak host memory at one tensor rather than one shard.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, seed: int = 0, low: float = -0.02, high: float = 0.02) -> None:
    """Seeded uniform init on each parameter's own device (no host copy)."""
    generators: dict[torch.device, torch.Generator] = {}

    def gen_for(device):
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return generators[device]

    quantized = set()
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.init_dummy(module, gen_for(next(module.parameters()).device))
            quantized.update(id(p) for n, p in module.named_parameters() if n != "bias")
    for name, param in model.named_parameters():
        if id(param) in quantized:
            continue
        gen = gen_for(param.device)
        if param.dim() == 1 and name.endswith("norm.weight"):  # LayerNorm biases take the bias init
            param.fill_(1.0)
        elif param.dim() == 1:
            param.uniform_(low / 10, high / 10, generator=gen)
        else:
            param.uniform_(low, high, generator=gen)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_config: ModelConfig, load_format: str = "auto") -> nn.Module:
    """The model for `model_config`, its parameters in model_config.dtype on
    model_config.device, weights loaded (or dummy), in eval mode."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported: use one of {LOAD_FORMATS}")
    cls = get_model_class(model_config.hf_config)
    # Parameters are allocated straight on the device in the target dtype; the rotary
    # tables pin float32 explicitly.
    with _default_dtype(model_config.dtype), torch.device(model_config.device):
        model = cls(model_config)
    with torch.no_grad():
        if load_format == "dummy":
            initialize_dummy_weights(model, seed=model_config.seed)
        else:
            model.load_weights(iterate_weights(model_config.model, load_format))
        process_weights_after_loading(model)
    return model.eval()


def process_weights_after_loading(model: nn.Module) -> None:
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def describe_weights(model: nn.Module, model_config: ModelConfig) -> str:
    """'weights: 5.73 GB (awq int4, group 128)' for the load log."""
    qc = model_config.quant_config
    fmt = qc.describe() if qc is not None else str(model_config.dtype).replace("torch.", "")
    return f"weights: {weight_bytes(model) / 1e9:.2f} GB ({fmt})"
