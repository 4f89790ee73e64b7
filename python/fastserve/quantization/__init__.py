"""Quantized checkpoints: which format a checkpoint is in, and the per-format configs.

Detection: config.json `quantization_config`, else `quantize_config.json` (AutoGPTQ /
GPTQModel) or `quant_config.json` (old AutoAWQ) in the model directory. `quantization=` /
`--quantization` takes vLLM's names, case-insensitively (awq, gptq, fp8, compressed-tensors;
awq_marlin / gptq_marlin are aliases: the kernel is fastserve's own either way); a name that
contradicts the checkpoint is a ValueError. `fp8` on an unquantized checkpoint quantizes the
weights at load."""

from __future__ import annotations

import json
import os

from fastserve.quantization.awq import AWQConfig
from fastserve.quantization.base import QuantConfig
from fastserve.quantization.compressed_tensors import CompressedTensorsConfig
from fastserve.quantization.fp8 import Fp8Config
from fastserve.quantization.gptq import GPTQConfig

QUANTIZATION_METHODS: dict[str, type[QuantConfig]] = {
    "awq": AWQConfig,
    "gptq": GPTQConfig,
    "fp8": Fp8Config,
    "compressed-tensors": CompressedTensorsConfig,
}
_ALIASES = {
    "awq_marlin": "awq",
    "gptq_marlin": "gptq",
    "compressed_tensors": "compressed-tensors",
    "compressedtensors": "compressed-tensors",
}
# Architectures whose quantized checkpoints are tested to load (GPT-NeoX interleaves its fused
# QKV by head at load, which the packed layouts do not support; OPT is not tested yet).
QUANTIZABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

__all__ = [
    "QuantConfig",
    "AWQConfig",
    "GPTQConfig",
    "Fp8Config",
    "CompressedTensorsConfig",
    "QUANTIZATION_METHODS",
    "normalize_quantization",
    "checkpoint_quantization_config",
    "resolve_quant_config",
]


def normalize_quantization(name: str | None) -> str | None:
    """vLLM name (any case, aliases) -> ours; None / 'none' -> None."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"quantization must be a string, got {name!r}")
    key = name.strip().lower()
    if key in ("", "none"):
        return None
    key = _ALIASES.get(key, key)
    if key == "gguf":
        return key  # vLLM's name for a .gguf file's own quantization (dequantized at load)
    if key not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization={name!r} is not supported: use one of {sorted(QUANTIZATION_METHODS)} "
            f"(or the aliases {sorted(_ALIASES)}), or leave it unset to follow the checkpoint"
        )
    return key


def checkpoint_quantization_config(hf_config: dict, model_dir: str | None) -> dict | None:
    """The checkpoint's quantization config with `quant_method` filled in, or None."""
    cfg = hf_config.get("quantization_config")
    if isinstance(cfg, dict) and cfg:
        cfg = dict(cfg)
    else:
        cfg = None
        for fname in ("quantize_config.json", "quant_config.json"):
            path = os.path.join(model_dir, fname) if model_dir and os.path.isdir(model_dir) else None
            if path and os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    cfg = json.load(f)
                break
        if cfg is None:
            return None
    method = cfg.get("quant_method")
    if method is None:
        # AutoAWQ's quant_config.json spells bits w_bit; AutoGPTQ's quantize_config.json has no quant_method.
        method = "awq" if "w_bit" in cfg or "zero_point" in cfg else "gptq"
    cfg["quant_method"] = _ALIASES.get(str(method).lower(), str(method).lower())
    return cfg


# What `load_format="dummy"` with a quantization and no quantization_config lays out: the common
# real-checkpoint settings (AutoAWQ / GPTQModel defaults, llm-compressor W4A16, AutoFP8).
DUMMY_DEFAULTS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "compressed-tensors": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
            }
        },
        "ignore": ["lm_head"],
    },
}


def resolve_quant_config(
    quantization: str | None, hf_config: dict, model_dir: str | None, dummy: bool = False
) -> QuantConfig | None:
    """The QuantConfig the model loads with (None: unquantized); ValueError when `quantization`
    contradicts the checkpoint or names a format the checkpoint is not in. dummy (load_format
    "dummy"): a quantization the config does not describe gets DUMMY_DEFAULTS' layout."""
    asked = normalize_quantization(quantization)
    if asked == "gguf":
        raise ValueError(
            "quantization='gguf' needs a .gguf file as the model; this checkpoint is a Hugging Face "
            "directory: leave quantization unset"
        )
    cfg = checkpoint_quantization_config(hf_config, model_dir)
    found = cfg["quant_method"] if cfg else None
    if found is not None and found not in QUANTIZATION_METHODS:
        raise ValueError(
            f"the checkpoint's quantization_config has quant_method {found!r}, which fastserve does not "
            f"load (supported: {sorted(QUANTIZATION_METHODS)}); use an unquantized or a supported "
            "checkpoint"
        )
    if asked is not None and found is not None and asked != found:
        raise ValueError(
            f"quantization={quantization!r} contradicts the checkpoint, whose quantization_config says "
            f"quant_method {found!r}: pass quantization={found!r} or leave it unset"
        )
    if found is None and asked is not None and dummy:
        cfg, found = dict(DUMMY_DEFAULTS[asked]), asked
    if found is None:
        if asked is None:
            return None
        if asked == "fp8":
            return Fp8Config.on_load()
        raise ValueError(
            f"quantization={quantization!r} was asked for but the checkpoint has no quantization_config "
            f"(config.json, quantize_config.json or quant_config.json): it is unquantized; only 'fp8' "
            "can quantize an unquantized checkpoint at load"
        )
    arch = (hf_config.get("architectures") or [""])[0]
    if arch not in QUANTIZABLE_ARCHITECTURES:
        raise ValueError(
            f"quantized {arch} checkpoints are not supported yet; quantized checkpoints load for "
            f"{', '.join(QUANTIZABLE_ARCHITECTURES)}"
        )
    qc = QUANTIZATION_METHODS[found].from_config(cfg)
    if isinstance(qc, GPTQConfig) and not qc.lm_head and not dummy and _checkpoint_has(model_dir, "lm_head.qweight"):
        qc.lm_head = True  # some exporters quantize the head without saying so in the config
    return qc


def _checkpoint_has(model_dir: str | None, name: str) -> bool:
    """Whether a safetensors checkpoint holds tensor `name` (headers / the index only)."""
    if not model_dir or not os.path.isdir(model_dir):
        return False
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return name in json.load(f).get("weight_map", {})
    from safetensors import safe_open

    for fname in sorted(os.listdir(model_dir)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, fname), framework="pt") as f:
                if name in f.keys():
                    return True
    return False


def linear_shapes(model_config) -> list[tuple[str, str, int, list[int]]]:
    """(prefix, 'column' | 'row', K, N of each fused part) of every linear layer of a
    Llama-family model, for checking a tensor-parallel split before anything is allocated."""
    c = model_config
    hd = c.head_dim
    q, kv, h, inter = c.num_attention_heads * hd, c.num_kv_heads * hd, c.hidden_size, c.intermediate_size
    out = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.qkv_proj", "column", h, [q, kv, kv]),
            (f"{p}.self_attn.o_proj", "row", q, [h]),
            (f"{p}.mlp.gate_up_proj", "column", h, [inter, inter]),
            (f"{p}.mlp.down_proj", "row", inter, [h]),
        ]
    return out


def check_tensor_parallel(model_config, tp: int) -> None:
    """ValueError naming the layer, the dimension and the group size when the quantized layout
    cannot be split over `tp` ranks (called before the model is built)."""
    qc = model_config.quant_config
    c = model_config
    if qc is None or c.architecture not in QUANTIZABLE_ARCHITECTURES:
        return
    if c.num_attention_heads % tp or c.intermediate_size % tp or (c.num_kv_heads % tp and tp % c.num_kv_heads):
        return  # the executor's own check names the head or intermediate count that tp must divide
    kv_tp = tp if model_config.num_kv_heads >= tp else model_config.num_kv_heads
    for prefix, kind, k, parts in linear_shapes(model_config):
        method = qc.get_linear_method(None, prefix)
        if method is None or not hasattr(method, "check_shapes"):
            continue
        if kind == "row":
            method.check_shapes(prefix, k // tp, k, parts, kind, tp)
        else:
            local = [parts[0] // tp] + [n // kv_tp for n in parts[1:]] if len(parts) == 3 else [n // tp for n in parts]
            method.check_shapes(prefix, k, k, local, kind, tp)
