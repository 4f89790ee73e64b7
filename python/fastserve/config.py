"""ModelConfig: what the engine needs from a Hugging Face `config.json`, resolved once.

Parsed from the JSON directly (not through `transformers`, which is only a test dependency),
accepting both the transformers 4.x layout (`rope_theta` + `rope_scaling`) and the 5.x one
(`rope_parameters` holding `rope_theta`), and both `torch_dtype` and `dtype`.

dtype rules ("auto" follows vLLM's `_resolve_auto_dtype`):
- "auto": the checkpoint's `torch_dtype` (float32 when the config names none), except that a
  float32 checkpoint runs in bfloat16 on a CUDA device that supports it (float16 otherwise),
  as vLLM downcasts float32 models to the platform's preferred dtype. On CPU a float32
  checkpoint stays float32: CPU is the reference/test path and exact parity with HF matters
  more there than speed.
- "half"/"float16", "bfloat16", "float"/"float32": that dtype, whatever the checkpoint holds
  (vLLM only warns when casting between float16 and bfloat16; so do we, silently).

max_model_len rules (vLLM's `_get_and_verify_max_len`): the smallest of the config's length
keys (`max_position_embeddings`, `n_positions`, `max_seq_len`, `seq_length`, ...), times the
rope scaling `factor` for rope types that do not already count it (linear, dynamic; yarn
starts from `original_max_position_embeddings`), llama3/longrope/su/mrope are not multiplied.
A sliding window we do not implement caps the length to the window (vLLM's
`disable_sliding_window` behaviour), so attention stays exact. A user max_model_len above
the derived limit is a ValueError.

Architectures that spell a field differently (OPT's `ffn_dim`, GPT-NeoX 4.x's `rotary_pct`)
are read through per-architecture aliases, and fields config.json leaves out get the
default of that architecture's HF config class (OPT ties its LM head, NeoX rotates 25%).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

_STR_TO_DTYPE = {
    "half": torch.float16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
    "fp32": torch.float32,
}

# vLLM's list of config keys that bound the sequence length; the smallest present wins.
_MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)

# Rope types whose `max_position_embeddings` already counts the scaling (vLLM does not
# multiply by `factor` for these).
_ROPE_TYPES_ALREADY_SCALED = ("su", "longrope", "llama3", "mrope", "default")

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# architecture -> {its config.json key: our key}; the alias is read only when our key is absent.
_ARCH_FIELD_ALIASES: dict[str, dict[str, str]] = {
    "OPTForCausalLM": {"ffn_dim": "intermediate_size", "activation_function": "hidden_act"},
    "GPTNeoXForCausalLM": {"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"},
}
# architecture -> HF config-class defaults that differ from the Llama-like ones below.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "OPTForCausalLM": {"hidden_act": "relu", "tie_word_embeddings": True},
    "GPTNeoXForCausalLM": {"hidden_act": "gelu", "partial_rotary_factor": 0.25},
}


def _with_arch_fields(hf: dict, arch: str) -> dict:
    """A copy of config.json with `arch`'s aliases and defaults resolved to our field names."""
    out = dict(hf)
    for alias, key in _ARCH_FIELD_ALIASES.get(arch, {}).items():
        if out.get(key) is None and alias in out:
            out[key] = out[alias]
    for key, value in _ARCH_DEFAULTS.get(arch, {}).items():
        if out.get(key) is None:
            out[key] = value
    return out


def partial_rotary_factor(hf: dict) -> float:
    """The rotated fraction of each head: rope_parameters' (transformers 5) or the top-level
    field (4.x), 1.0 when neither is set."""
    params = hf.get("rope_parameters")
    value = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if value is None:
        value = hf.get("partial_rotary_factor")
    value = 1.0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"config.json partial_rotary_factor (rotary_pct) must be in (0, 1], got {value!r}")
    return float(value)


def _config_key(arch: str, key: str) -> str:
    """How `arch`'s config.json spells our field `key` (for error messages)."""
    return next((alias for alias, k in _ARCH_FIELD_ALIASES.get(arch, {}).items() if k == key), key)


def _require_int(hf: dict, key: str, spelled: str | None = None) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.json field {spelled or key!r} must be a positive integer, got {value!r}")
    return value


def _dtype_from_config(hf: dict) -> torch.dtype:
    name = hf.get("torch_dtype") or hf.get("dtype")
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    name = str(name).replace("torch.", "")
    if name not in _STR_TO_DTYPE:
        raise ValueError(f"config.json torch_dtype {name!r} is not one of {sorted(_STR_TO_DTYPE)}")
    return _STR_TO_DTYPE[name]


def resolve_dtype(dtype: str | torch.dtype, hf_config: dict, device: torch.device | str) -> torch.dtype:
    """The dtype the model runs in (see the module docstring for the rules)."""
    device = torch.device(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype {dtype} is not supported: use auto, float16, bfloat16 or float32")
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key != "auto":
        if key not in _STR_TO_DTYPE:
            raise ValueError(
                f"dtype {dtype!r} is not supported: use one of "
                "'auto', 'half', 'float16', 'bfloat16', 'float', 'float32'"
            )
        return _STR_TO_DTYPE[key]
    config_dtype = _dtype_from_config(hf_config)
    if config_dtype == torch.float32 and device.type == "cuda":
        # vLLM downcasts float32 checkpoints to the platform's preferred half type on GPU.
        try:
            bf16 = torch.cuda.is_bf16_supported()
        except Exception:  # noqa: BLE001 - a CUDA device we cannot query: be conservative
            bf16 = False
        return torch.bfloat16 if bf16 else torch.float16
    return config_dtype


def rope_parameters(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either config layout; the scaling dict always
    carries `rope_type` (old configs spell it `type`)."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        if theta is None:
            theta = params.get("rope_theta")
        if scaling is None:
            scaling = params
    if theta is None:
        theta = 10000.0
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling.pop("type", None)
        scaling.pop("rope_theta", None)
        scaling.pop("partial_rotary_factor", None)
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
    return float(theta), scaling


def derive_max_model_len(hf: dict) -> tuple[int, str]:
    """(derived max_model_len, a description of where it came from for error messages)."""
    found = {k: hf[k] for k in _MAX_LEN_KEYS if isinstance(hf.get(k), int)}
    if not found:
        # vLLM's fallback when a config names no length.
        return 2048, "no length key in config.json (default 2048)"
    key = min(found, key=found.get)
    derived = found[key]
    source = f"{key}={derived}"
    _, scaling = rope_parameters(hf)
    if scaling is not None and scaling["rope_type"] not in _ROPE_TYPES_ALREADY_SCALED:
        factor = float(scaling.get("factor", 1.0))
        if scaling["rope_type"] == "yarn":
            derived = scaling.get("original_max_position_embeddings", derived)
        derived = int(derived * factor)
        source += f" x rope_scaling factor {factor}"
    window = sliding_window(hf)
    if window is not None and window < derived:
        derived = window
        source += f", capped to sliding_window={window} (sliding-window attention is not implemented)"
    return derived, source


def sliding_window(hf: dict) -> int | None:
    window = hf.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        return None
    # Qwen2/Qwen3 configs carry a window that is off unless use_sliding_window is set.
    if hf.get("use_sliding_window") is False:
        return None
    return window


@dataclass
class ModelConfig:
    """A model's shape and runtime settings, resolved from its config.json.

    Build with `ModelConfig.from_pretrained(path, dtype=..., max_model_len=..., device=...)`
    or `ModelConfig.from_hf_config(dict, ...)`."""

    model: str
    hf_config: dict[str, Any]
    architecture: str
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    hidden_act: str
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    seed: int = 0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # The checkpoint's quantization (None: unquantized); every linear layer receives it with
    # its checkpoint name and picks its weight layout and matmul from it.
    quant_config: Any = None
    # LayerNorm models (OPT, GPT-NeoX): `layer_norm_eps`, torch's default when absent (OPT).
    layer_norm_eps: float = 1e-5
    # Fraction of head_dim that rotary rotates (GPT-NeoX `rotary_pct`); 1.0 is a full rotary.
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        quantization: str | None = None,
        load_format: str = "auto",
    ) -> ModelConfig:
        from fastserve.gguf_loader import hf_config, is_gguf

        if is_gguf(model):  # one-file llama.cpp checkpoint: the config comes from its metadata
            if str(quantization).lower() not in ("none", "gguf"):
                raise ValueError(
                    f"quantization={quantization!r} does not apply to a .gguf file (it is dequantized "
                    "at load): leave quantization unset"
                )
            return cls.from_hf_config(
                hf_config(model),
                model=os.fspath(model),
                dtype=dtype,
                max_model_len=max_model_len,
                device=device,
                seed=seed,
            )
        path = os.path.join(os.fspath(model), "config.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"model {os.fspath(model)!r} has no config.json: pass a local Hugging Face model directory "
                "or a .gguf file"
            )
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
        return cls.from_hf_config(
            hf,
            model=os.fspath(model),
            dtype=dtype,
            max_model_len=max_model_len,
            device=device,
            seed=seed,
            quantization=quantization,
            load_format=load_format,
        )

    @classmethod
    def from_hf_config(
        cls,
        hf: dict[str, Any],
        *,
        model: str = "",
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        quantization: str | None = None,
        load_format: str = "auto",
    ) -> ModelConfig:
        """quantization: vLLM's name (None: follow the checkpoint's quantization_config); see
        fastserve/quantization/__init__.py. load_format "dummy" lets a quantization the config
        does not describe lay out random weights in that format's default layout."""
        from fastserve.quantization import resolve_quant_config

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no `architectures` entry: cannot tell which model class to build")
        hf_config, hf = hf, _with_arch_fields(hf, archs[0])
        hidden = _require_int(hf, "hidden_size")
        heads = _require_int(hf, "num_attention_heads")
        kv_heads = hf.get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else _require_int(hf, "num_key_value_heads")
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        head_dim = hf.get("head_dim") or hidden // heads
        theta, scaling = rope_parameters(hf)
        if scaling is not None and scaling["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {scaling['rope_type']!r} is not supported: supported are {SUPPORTED_ROPE_TYPES}"
            )
        derived, source = derive_max_model_len(hf)
        if max_model_len is None:
            max_model_len = derived
        elif not isinstance(max_model_len, int) or max_model_len <= 0:
            raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}")
        elif max_model_len > derived:
            raise ValueError(
                f"max_model_len ({max_model_len}) is greater than the derived max_model_len ({source} in the "
                f"model's config.json = {derived}); use a max_model_len of at most {derived}"
            )
        quant_config = resolve_quant_config(quantization, hf_config, model or None, dummy=load_format == "dummy")
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            model=model,
            hf_config=hf_config,
            architecture=archs[0],
            dtype=resolve_dtype(dtype, hf, device),
            device=device,
            max_model_len=max_model_len,
            vocab_size=_require_int(hf, "vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=_require_int(hf, "num_hidden_layers"),
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            intermediate_size=_require_int(hf, "intermediate_size", _config_key(archs[0], "intermediate_size")),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            hidden_act=str(hf.get("hidden_act", "silu")),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", derived)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            seed=seed,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            partial_rotary_factor=partial_rotary_factor(hf),
            quant_config=quant_config,
        )

    def get_num_kv_heads(self, tp_size: int = 1) -> int:
        """KV heads held by one tensor-parallel rank (replicated when fewer heads than ranks)."""
        return max(1, self.num_kv_heads // tp_size)
