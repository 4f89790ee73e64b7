"""Bit packing shared by the int formats: every checkpoint layout is unpacked to integers once at
load and re-packed into the kernel's layout (kernels/quant_gemm.py: int32 [K // pack, N], value
(k, n) in bits `bits * (k % pack)` of word (k // pack, n))."""

from __future__ import annotations

import torch

# AutoAWQ packs 8 columns per word in this order: nibble i holds logical column AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit words -> int32 with the same bits."""
    v = v & 0xFFFFFFFF
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int64 values of an int32 tensor packed along `dim`: logical index p * pack + j sits in the
    nibble `order.index(j)` (sequential when order is None) of word p."""
    pack = 32 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int64) & 0xFFFFFFFF
    nib = order if order is not None else tuple(range(pack))
    # Logical slot j lives in nibble position nib.index(j).
    shifts = [bits * nib.index(j) for j in range(pack)]
    parts = [(p >> s) & mask for s in shifts]
    out = torch.stack(parts, dim=dim + 1)  # [..., words, pack, ...]
    shape = list(packed.shape)
    shape[dim] *= pack
    return out.reshape(shape)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words packing `values` (integers in [0, 2**bits)) sequentially along `dim`."""
    pack_n = 32 // bits
    v = values.to(torch.int64)
    shape = list(v.shape)
    if shape[dim] % pack_n:
        raise ValueError(f"cannot pack {shape[dim]} values along dim {dim} into words of {pack_n}")
    shape[dim] //= pack_n
    shape.insert(dim + 1, pack_n)
    v = v.reshape(shape)
    out = torch.zeros([s for i, s in enumerate(shape) if i != dim + 1], dtype=torch.int64, device=values.device)
    for j in range(pack_n):
        out |= v.select(dim + 1, j) << (bits * j)
    return _to_int32(out)


def sort_by_group(q_kn: torch.Tensor, g_idx: torch.Tensor, num_groups: int, where: str):
    """Act order: rows sorted by group once (stable), so each group's rows are contiguous and the
    kernel gathers x's columns through `perm`. (q sorted, perm int32, rows per group)."""
    g_idx = g_idx.to(torch.int64)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups):
        raise ValueError(f"{where}: g_idx holds groups outside 0..{num_groups - 1}: the checkpoint is corrupt")
    counts = torch.bincount(g_idx, minlength=num_groups)
    if not bool((counts == counts[0]).all()):
        raise ValueError(
            f"{where}: g_idx puts {counts.tolist()} rows in its groups; only equal-size groups "
            "(what GPTQ / llm-compressor write) are supported"
        )
    perm = torch.argsort(g_idx, stable=True)
    return q_kn.index_select(0, perm), perm.to(torch.int32), int(counts[0])


def is_trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """g_idx == k // group_size: no act order, nothing to permute."""
    k = g_idx.numel()
    return bool(torch.equal(g_idx.to(torch.int64).cpu(), torch.arange(k) // group_size))
