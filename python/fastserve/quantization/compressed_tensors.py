"""compressed-tensors (llm-compressor output): `config_groups` of schemes (weights, input
activations, targets), a global `format`, and an `ignore` list of unquantized modules.

- pack-quantized (W4A16, W4A16_ASYM, W8A16): weight_packed int32 [N, K / pack] (nn.Linear
  orientation, packed along K, values stored q + 2**(bits - 1)), weight_scale [N, G],
  weight_zero_point [N / pack, G] packed along N (asymmetric; also stored + 2**(bits - 1)),
  weight_g_idx [K] (act order), weight_shape [2]. Transposed, it is the kernel's layout.
- float-quantized (FP8_DYNAMIC per channel, FP8 static per tensor): the FP8 method of fp8.py."""

from __future__ import annotations

import re

import torch

from fastserve.quantization.base import (
    QuantConfig,
    checkpoint_names,
    loaded,
    make_param,
    matches_module_list,
    one_answer,
)
from fastserve.quantization.fp8 import Fp8BlockMethod, Fp8LinearMethod
from fastserve.quantization.int_weight import IntLinearMethod, dummy_int32, dummy_scales
from fastserve.quantization.packing import unpack


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    def __init__(self, config_groups: dict, fmt: str | None, ignore: list[str] | None):
        self.config_groups = config_groups or {}
        self.format = fmt
        self.ignore = list(ignore or [])
        if not self.config_groups:
            raise ValueError(
                "compressed-tensors quantization_config has no config_groups: nothing says how the "
                "weights are quantized"
            )
        for name, group in self.config_groups.items():
            self._method_for(group, name)  # refuse an unsupported scheme before any memory is taken

    @classmethod
    def from_config(cls, cfg: dict) -> CompressedTensorsConfig:
        return cls(cfg.get("config_groups"), cfg.get("format"), cfg.get("ignore"))

    def describe(self) -> str:
        parts = []
        for group in self.config_groups.values():
            w = group.get("weights") or {}
            kind = "fp8" if w.get("type") == "float" else f"int{w.get('num_bits')}"
            strat = w.get("strategy")
            detail = f"group {w.get('group_size')}" if strat == "group" else f"per-{strat}"
            parts.append(f"{kind} {detail}")
        return f"compressed-tensors {group.get('format') or self.format} ({'; '.join(parts)})"

    def _group_for(self, name: str) -> dict | None:
        for group in self.config_groups.values():
            for target in group.get("targets") or ["Linear"]:
                if target == "Linear" or target == name or (target.startswith("re:") and re.match(target[3:], name)):
                    return group
        return None

    def _method_for(self, group: dict, where: str):
        fmt = group.get("format") or self.format
        w = group.get("weights") or {}
        act = group.get("input_activations")
        bits, kind, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
        if kind == "float" and bits == 8:
            if strategy == "block":
                return Fp8BlockMethod(tuple(w.get("block_structure") or (128, 128)))
            static = bool(act) and not act.get("dynamic", True)
            return Fp8LinearMethod(strategy or "tensor", static, ignored=("weight_zero_point", "input_zero_point"))
        if kind == "int" and fmt == "pack-quantized" and not act:
            if strategy not in ("group", "channel"):
                raise ValueError(
                    f"compressed-tensors {where}: int weight strategy {strategy!r} is not supported "
                    "(group, channel are)"
                )
            gs = int(w.get("group_size") or -1) if strategy == "group" else -1
            actorder = w.get("actorder")
            return CTIntLinearMethod(
                int(bits), gs, bool(w.get("symmetric", True)), actorder not in (None, False, "weight", "static")
            )
        raise ValueError(
            f"compressed-tensors {where}: scheme format={fmt!r} weights={kind}{bits} "
            f"input_activations={act!r} is not supported; supported are pack-quantized W4A16 / "
            "W4A16_ASYM / W8A16 and float-quantized FP8 (FP8_DYNAMIC, FP8 static)"
        )

    def get_linear_method(self, layer, prefix: str):
        if matches_module_list(prefix, self.ignore):
            return None
        groups = [self._group_for(n) for n in checkpoint_names(prefix)]
        group = one_answer(prefix, [id(g) if g is not None else None for g in groups], "compressed-tensors schemes")
        if group is None:
            return None
        return self._method_for(groups[0], prefix)


class CTIntLinearMethod(IntLinearMethod):
    def __init__(self, bits: int, group_size: int, symmetric: bool, act_order: bool):
        if bits not in (4, 8):
            raise ValueError(f"compressed-tensors: {bits}-bit int weights are not supported (4 and 8 are)")
        self.bits, self.group_size, self.symmetric, self.act_order = bits, group_size, symmetric, act_order
        self.pack_n = 1 if symmetric else 32 // bits  # only the zero points are packed along N

    def create_weights(self, layer) -> None:
        self.check_layer(layer)
        k, groups, replicated = self.layout(layer)
        n, pack = layer.output_size, 32 // self.bits
        gdim = None if replicated else 1
        make_param(layer, "weight_packed", (n, k // pack), torch.int32, output_dim=0, input_dim=1)
        make_param(layer, "weight_scale", (n, groups), layer.params_dtype, output_dim=0, input_dim=gdim)
        if not self.symmetric:
            make_param(
                layer,
                "weight_zero_point",
                (n // pack, groups),
                torch.int32,
                output_dim=0,
                input_dim=gdim,
                pack_out=pack,
            )
        else:
            # Some exporters write the (all-zero) zero points of a symmetric scheme too.
            zp = make_param(layer, "weight_zero_point", (0,), torch.int32, optional=True)
            zp.weight_loader = _ignore
        make_param(layer, "weight_g_idx", (k,), torch.int32, input_dim=0, optional=True)
        shape = make_param(layer, "weight_shape", (2,), torch.int64, optional=True)
        shape.weight_loader = _ignore  # the shapes come from config.json; fused parts' differ

    def _drop(self):
        return ["weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape"]

    def _unpacked(self, layer):
        q = unpack(layer.weight_packed.data, self.bits, 1).t()
        scales = layer.weight_scale.data.float().t()
        if self.symmetric:
            zeros = torch.full(scales.shape, float(1 << (self.bits - 1)), device=q.device)
        else:
            zeros = unpack(layer.weight_zero_point.data, self.bits, 0).float().t()
        g_idx = layer.weight_g_idx.data if loaded(layer, "weight_g_idx") else None
        if g_idx is not None and layer.tp_dim == 1 and layer.tp_size > 1 and self.group_size != -1:
            g_idx = g_idx - layer.tp_rank * scales.shape[0]
        elif g_idx is not None and self.group_size == -1:
            g_idx = torch.zeros_like(g_idx)
        return q, scales, zeros, g_idx

    def init_dummy(self, layer, generator: torch.Generator) -> None:
        dummy_int32(layer.weight_packed.data, generator)
        dummy_scales(layer.weight_scale.data, generator, self.bits)
        if not self.symmetric:
            dummy_int32(layer.weight_zero_point.data, generator)


def _ignore(param, loaded_weight, shard_id=None) -> None:
    pass
