"""AWQ GEMM (AutoAWQ, GPTQModel FORMAT.GEMM): qweight int32 [K, N / 8] and qzeros [G, N / 8] packed
along N in AutoAWQ's nibble order (0, 2, 4, 6, 1, 3, 5, 7), scales [G, N]; W = (q - z) * s, zeros
stored as is. Converted once at load into the kernel's K-packed layout.

`zero_point: false` (symmetric exports): the zero point is 2**(bits - 1) unless the checkpoint
still carries qzeros."""

from __future__ import annotations

import torch

from fastserve.quantization.base import QuantConfig, loaded, make_param, matches_module_list
from fastserve.quantization.int_weight import IntLinearMethod, dummy_int32, dummy_scales
from fastserve.quantization.packing import AWQ_ORDER, unpack


class AWQConfig(QuantConfig):
    name = "awq"

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        modules_to_not_convert: list[str] | None = None,
        version: str = "gemm",
    ):
        if bits != 4:
            raise ValueError(f"AWQ with {bits}-bit weights is not supported (AWQ GEMM checkpoints are 4-bit)")
        if group_size != -1 and (group_size <= 0 or group_size % 8):
            raise ValueError(f"AWQ group_size {group_size} must be -1 or a positive multiple of 8")
        if str(version).lower() != "gemm":
            raise ValueError(
                f"AWQ version {version!r} is not supported: only 'gemm' checkpoints load (re-export with "
                "AutoAWQ version='GEMM')"
            )
        self.bits, self.group_size, self.zero_point = bits, group_size, zero_point
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, cfg: dict) -> AWQConfig:
        bits = cfg.get("bits", cfg.get("w_bit", 4))
        group = cfg.get("group_size", cfg.get("q_group_size", 128))
        version = cfg.get("version") or cfg.get("format") or "gemm"
        # GPTQModel's AWQ configs say `sym` instead of `zero_point`.
        zero_point = cfg.get("zero_point", not cfg.get("sym", False))
        return cls(int(bits), int(group), bool(zero_point), cfg.get("modules_to_not_convert"), version)

    def describe(self) -> str:
        return f"awq int{self.bits}, group {self.group_size}{'' if self.zero_point else ', no zero point'}"

    def get_linear_method(self, layer, prefix: str):
        if matches_module_list(prefix, self.modules_to_not_convert):
            return None
        return AWQLinearMethod(self.bits, self.group_size, self.zero_point)


class AWQLinearMethod(IntLinearMethod):
    def __init__(self, bits: int, group_size: int, zero_point: bool):
        self.bits, self.group_size, self.zero_point = bits, group_size, zero_point
        self.pack_n = 32 // bits

    def create_weights(self, layer) -> None:
        self.check_layer(layer)
        k, groups, replicated = self.layout(layer)
        n, pack = layer.output_size, self.pack_n
        gdim = None if replicated else 0
        make_param(layer, "qweight", (k, n // pack), torch.int32, output_dim=1, input_dim=0, pack_out=pack)
        make_param(
            layer,
            "qzeros",
            (groups, n // pack),
            torch.int32,
            output_dim=1,
            input_dim=gdim,
            pack_out=pack,
            optional=not self.zero_point,
        )
        make_param(layer, "scales", (groups, n), layer.params_dtype, output_dim=1, input_dim=gdim)

    def _drop(self):
        return ["qzeros"]

    def _unpacked(self, layer):
        q = unpack(layer.qweight.data, self.bits, 1, AWQ_ORDER)
        if loaded(layer, "qzeros"):
            zeros = unpack(layer.qzeros.data, self.bits, 1, AWQ_ORDER).float()
        else:
            zeros = torch.full(layer.scales.shape, float(1 << (self.bits - 1)), device=q.device)
        return q, layer.scales.data.float(), zeros, None

    def init_dummy(self, layer, generator: torch.Generator) -> None:
        dummy_int32(layer.qweight.data, generator)
        dummy_int32(layer.qzeros.data, generator)
        layer.qzeros.loaded = True
        dummy_scales(layer.scales.data, generator, self.bits)
