"""MLP activations: gated (SwiGLU, Llama family) and plain elementwise (ReLU/GELU: OPT, GPT-NeoX)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x[..., 2I] laid out [gate | up] -> silu(gate) * up, [..., I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from fastserve.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def get_act_and_mul(hidden_act: str) -> nn.Module:
    if hidden_act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {hidden_act!r} is not supported by this model family: only 'silu' is")
    return SiluAndMul()


class ReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class GELU(nn.Module):
    """Exact (erf) GELU, or the tanh approximation with approximate="tanh"."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


class SiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


# Hugging Face's ACT2FN names. The elementwise torch ops are single fused CUDA kernels
# already, so there is no Triton version of these. gelu_new / gelu_fast are HF's hand-written
# tanh formulas: the same function as torch's tanh approximation (equal to ~1e-7 in float32).
_ACTIVATIONS = {
    "relu": ReLU,
    "gelu": GELU,
    "gelu_pytorch_tanh": lambda: GELU("tanh"),
    "gelu_new": lambda: GELU("tanh"),
    "gelu_fast": lambda: GELU("tanh"),
    "silu": SiLU,
    "swish": SiLU,
}


def get_act_fn(name: str, field: str = "hidden_act") -> nn.Module:
    """A non-gated activation by its config.json name; `field` names the config key in the error."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"config.json {field} {name!r} is not supported: use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()
