"""Weight-only int4 / int8 linear (W4A16, W8A16) in the kernel's layout, shared by GPTQ, AWQ and
compressed-tensors pack-quantized: each format unpacks its checkpoint tensors to integers,
this class sorts act-order rows once, packs along K and keeps float scales and zero points.

Tensor parallelism: column-parallel splits N (every tensor's N axis; N-packed words by whole
words), row-parallel splits K (qweight rows, g_idx, and the group axis of scales / zeros when
the groups line up with the split; one group for all of K (-1, per-channel) is replicated)."""

from __future__ import annotations

import torch

from fastserve.kernels.quant_gemm import w_int_matmul
from fastserve.quantization.base import replace_with_buffers
from fastserve.quantization.packing import is_trivial_g_idx, pack, sort_by_group


class IntLinearMethod:
    """Subclasses set bits, group_size (-1: all of K), act_order and pack_n (the N packing of
    their tensors: 1 or 32 // bits) and implement create_weights / _unpacked."""

    bits: int
    group_size: int
    act_order: bool = False
    pack_n: int = 1
    label: str = "int"

    # -- shapes ---------------------------------------------------------------------------------

    def layout(self, layer) -> tuple[int, int, bool]:
        """(K per rank, groups this rank holds, whether the groups are replicated across ranks)."""
        k = layer.input_size
        row_split = layer.tp_dim == 1 and layer.tp_size > 1
        if self.group_size == -1:
            return k, 1, row_split
        return k, k // self.group_size, False

    def check_shapes(self, prefix: str, k_local: int, k_full: int, parts_local: list[int], kind: str, tp: int) -> None:
        """ValueError naming the module, the dimension and the group size when this rank's slice
        cannot hold whole packed words or whole groups."""
        pack_k = 32 // self.bits
        split = f"tensor_parallel_size={tp}: " if tp > 1 else ""
        if kind == "row" and tp > 1 and self.act_order:
            raise ValueError(
                f"{prefix}: {split}act-order (desc_act / actorder) weights cannot be split along "
                "their input dimension yet; run this checkpoint with tensor_parallel_size=1"
            )
        gs = self.group_size
        if gs != -1 and k_local % gs:
            where = (
                f"input dimension K={k_full} / {tp} = {k_local} per rank" if tp > 1 else f"input dimension K={k_local}"
            )
            raise ValueError(
                f"{prefix}: {split}the {where} is not a multiple of the group size {gs}; use a "
                f"tensor_parallel_size that divides {k_full // gs if k_full % gs == 0 else k_full} "
                f"({k_full} / group size)"
            )
        if k_local % pack_k:
            raise ValueError(
                f"{prefix}: {split}input dimension {k_local} per rank is not a multiple of {pack_k} "
                f"({self.bits}-bit values per packed word)"
            )
        for n in parts_local:
            if n % max(self.pack_n, 1):
                raise ValueError(
                    f"{prefix}: {split}output dimension {n} per rank (per fused part) is not a multiple "
                    f"of {self.pack_n} ({self.bits}-bit values per packed word along N)"
                    + (f" with group size {gs}" if gs != -1 else "")
                )

    def check_layer(self, layer) -> None:
        kind = "row" if layer.tp_dim == 1 else "column"
        k_full = layer.input_size * (layer.tp_size if kind == "row" else 1)
        self.check_shapes(layer.prefix, layer.input_size, k_full, layer.output_partition_sizes, kind, layer.tp_size)

    # -- after loading ----------------------------------------------------------------------------

    def _unpacked(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q int64 [K, N], scales float [G, N], zeros float [G, N], g_idx [K] or None)."""
        raise NotImplementedError

    def _drop(self) -> list[str]:
        raise NotImplementedError

    def process_weights_after_loading(self, layer) -> None:
        q, scales, zeros, g_idx = self._unpacked(layer)
        k = q.shape[0]
        groups = scales.shape[0]
        perm = None
        if g_idx is not None and not is_trivial_g_idx(g_idx, k // groups):
            q, perm, per_group = sort_by_group(q, g_idx, groups, layer.prefix)
            if per_group * groups != k:
                raise ValueError(
                    f"{layer.prefix}: g_idx has {per_group} rows per group for {groups} groups, but K is {k}"
                )
        dtype = torch.get_default_dtype() if not layer.params_dtype else layer.params_dtype
        layer.quant_group_size = -1 if groups == 1 else k // groups
        replace_with_buffers(
            layer,
            self._drop(),
            qweight=pack(q, self.bits, 0),
            scales=scales.to(dtype),
            zeros=zeros.to(dtype),
            perm=perm,
        )

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return w_int_matmul(
            x, layer.qweight, layer.scales, layer.zeros, layer.quant_group_size, self.bits, perm=layer.perm, bias=bias
        )


def dummy_int32(t: torch.Tensor, generator: torch.Generator) -> None:
    t.copy_(torch.randint(-(2**31), 2**31 - 1, t.shape, dtype=torch.int32, device=t.device, generator=generator))


def dummy_scales(t: torch.Tensor, generator: torch.Generator, bits: int) -> None:
    # (q - z) spans about 2**bits values: weights of a few hundredths, like the dummy bf16 init.
    t.uniform_(0.5, 1.5, generator=generator).mul_(0.02 / (1 << (bits - 1)))
