"""GPTQ (AutoGPTQ, GPTQModel, optimum): qweight int32 [K / pack, N] packed along K, qzeros
[G, N / pack] packed along N, scales [G, N], g_idx [K].

checkpoint_format "gptq" (v1) stores zeros minus one (z = stored + 1); "gptq_v2" stores them as
is. desc_act (act order): g_idx is a permutation of the groups; the rows are sorted by group
once at load and the kernel gathers x's columns. GPTQModel's `dynamic` maps module-name regexes
to per-module overrides (bits, group_size, desc_act, sym) or, with a "-:" prefix, to "leave this
module unquantized"."""

from __future__ import annotations

import re

import torch

from fastserve.quantization.base import QuantConfig, checkpoint_names, loaded, make_param, one_answer
from fastserve.quantization.int_weight import IntLinearMethod, dummy_int32, dummy_scales
from fastserve.quantization.packing import unpack

_KEYS = ("bits", "group_size", "desc_act", "sym")


class GPTQConfig(QuantConfig):
    name = "gptq"

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        desc_act: bool = False,
        sym: bool = True,
        checkpoint_format: str = "gptq",
        dynamic: dict | None = None,
        lm_head: bool = False,
    ):
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym
        self.checkpoint_format = checkpoint_format
        self.dynamic = dynamic or {}
        self.lm_head = lm_head
        _check_int(bits, group_size, "gptq")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"GPTQ checkpoint_format {checkpoint_format!r} is not supported (gptq, gptq_v2 are): "
                "re-save the checkpoint in GPTQ v1/v2 format (GPTQModel `format='gptq'`)"
            )

    @classmethod
    def from_config(cls, cfg: dict) -> GPTQConfig:
        fmt = cfg.get("checkpoint_format") or cfg.get("format") or "gptq"
        pack_dtype = str(cfg.get("pack_dtype", "int32")).replace("torch.", "")
        if pack_dtype != "int32":
            raise ValueError(
                f"GPTQ pack_dtype {pack_dtype!r} is not supported: re-save the checkpoint with "
                "GPTQModel's default pack_dtype int32"
            )
        return cls(
            bits=int(cfg.get("bits", 4)),
            group_size=int(cfg.get("group_size", 128)),
            desc_act=bool(cfg.get("desc_act", False)),
            sym=bool(cfg.get("sym", True)),
            checkpoint_format=str(fmt).lower(),
            dynamic=cfg.get("dynamic"),
            lm_head=bool(cfg.get("lm_head", False)),
        )

    def describe(self) -> str:
        extra = ", act order" if self.desc_act else ""
        v2 = ", v2" if self.checkpoint_format == "gptq_v2" else ""
        return f"gptq int{self.bits}, group {self.group_size}{extra}{v2}"

    def quantizes_lm_head(self) -> bool:
        return self.lm_head and self.module_settings("lm_head") is not None

    def module_settings(self, name: str) -> dict | None:
        """This module's (bits, group_size, desc_act, sym) after `dynamic`; None: not quantized."""
        settings = {k: getattr(self, k) for k in _KEYS}
        for pattern, override in self.dynamic.items():
            if pattern.startswith("-:"):
                if re.match(pattern[2:], name):
                    return None
                continue
            body = pattern[2:] if pattern.startswith("+:") else pattern
            if re.match(body, name):
                settings.update({k: v for k, v in (override or {}).items() if k in _KEYS})
        return settings

    def get_linear_method(self, layer, prefix: str):
        if prefix == "lm_head" and not self.lm_head:
            return None
        answers = [self.module_settings(n) for n in checkpoint_names(prefix)]
        settings = one_answer(prefix, answers, "GPTQ settings (`dynamic` overrides)")
        if settings is None:
            return None
        _check_int(int(settings["bits"]), int(settings["group_size"]), prefix)
        return GPTQLinearMethod(
            int(settings["bits"]),
            int(settings["group_size"]),
            bool(settings["desc_act"]),
            self.checkpoint_format == "gptq",
        )


def _check_int(bits: int, group_size: int, where: str) -> None:
    if bits not in (4, 8):
        raise ValueError(f"{where}: {bits}-bit weights are not supported (4 and 8 are)")
    if group_size != -1 and (group_size <= 0 or group_size % (32 // bits)):
        raise ValueError(f"{where}: group_size {group_size} must be -1 or a positive multiple of {32 // bits}")


class GPTQLinearMethod(IntLinearMethod):
    def __init__(self, bits: int, group_size: int, act_order: bool, v1_zeros: bool):
        self.bits, self.group_size, self.act_order, self.v1_zeros = bits, group_size, act_order, v1_zeros
        self.pack_n = 32 // bits  # qzeros are packed along N

    def create_weights(self, layer) -> None:
        self.check_layer(layer)
        k, groups, replicated = self.layout(layer)
        n, pack = layer.output_size, 32 // self.bits
        gdim = None if replicated else 0
        make_param(layer, "qweight", (k // pack, n), torch.int32, output_dim=1, input_dim=0)
        make_param(layer, "qzeros", (groups, n // pack), torch.int32, output_dim=1, input_dim=gdim, pack_out=pack)
        make_param(layer, "scales", (groups, n), layer.params_dtype, output_dim=1, input_dim=gdim)
        # GPTQModel and AutoGPTQ always write g_idx; some exporters drop it when it is trivial.
        make_param(layer, "g_idx", (k,), torch.int32, input_dim=0, optional=True)

    def _drop(self):
        return ["qzeros", "g_idx"]

    def _unpacked(self, layer):
        q = unpack(layer.qweight.data, self.bits, 0)
        zeros = unpack(layer.qzeros.data, self.bits, 1).float()
        if self.v1_zeros:
            zeros = zeros + 1
        g_idx = layer.g_idx.data if loaded(layer, "g_idx") else None
        if g_idx is not None and layer.tp_dim == 1 and layer.tp_size > 1 and self.group_size != -1:
            # A row-parallel rank holds groups [rank * G, (rank + 1) * G) of the checkpoint's.
            g_idx = g_idx - layer.tp_rank * layer.scales.shape[0]
        elif g_idx is not None and self.group_size == -1:
            g_idx = torch.zeros_like(g_idx)
        return q, layer.scales.data.float(), zeros, g_idx

    def init_dummy(self, layer, generator: torch.Generator) -> None:
        dummy_int32(layer.qweight.data, generator)
        dummy_int32(layer.qzeros.data, generator)
        dummy_scales(layer.scales.data, generator, self.bits)
        k = layer.g_idx.shape[0]
        gs = k if self.group_size == -1 else self.group_size
        layer.g_idx.data.copy_(torch.arange(k, device=layer.g_idx.device) // gs)
        layer.g_idx.loaded = True
