"""config.json `architectures` -> model class. A new model is one file plus one line here."""

from __future__ import annotations

from typing import Any

from torch import nn

from fastserve.models.gpt_neox import GPTNeoXForCausalLM
from fastserve.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from fastserve.models.opt import OPTForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def _architectures(hf_config: Any) -> list[str]:
    if isinstance(hf_config, dict):
        archs = hf_config.get("architectures")
    else:
        archs = getattr(hf_config, "architectures", None) or getattr(hf_config, "hf_config", {}).get("architectures")
    return list(archs or [])


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """hf_config: the config.json dict, a ModelConfig, or an object with `.architectures`.
    The first listed architecture that we support wins (as in vLLM)."""
    archs = _architectures(hf_config)
    for arch in archs:
        if arch in _MODELS:
            return _MODELS[arch]
    raise ValueError(
        f"model architectures {archs} are not supported: config.json `architectures` must name one of "
        f"{supported_architectures()}"
    )
