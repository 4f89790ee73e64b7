"""The unquantized linear method: a model-dtype weight [N, K] and F.linear, exactly what a layer
without a quant_config does (layers/linear.py takes that path directly, without this object, so
bf16 models pay nothing). Modules a checkpoint leaves unquantized get None from their config and
the same direct path; this class is the base of FP8-on-load (fp8.py), which loads such weights
and quantizes them after loading."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastserve.quantization.base import make_param


class UnquantizedLinearMethod:
    def create_weights(self, layer) -> None:
        make_param(
            layer, "weight", (layer.output_size, layer.input_size), torch.get_default_dtype(), output_dim=0, input_dim=1
        )

    def process_weights_after_loading(self, layer) -> None:
        pass

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def init_dummy(self, layer, generator: torch.Generator) -> None:
        layer.weight.uniform_(-0.02, 0.02, generator=generator)
