"""Tile shapes that fit the GPU's shared memory.

The swept defaults in the attention wrappers are for bf16/fp16. A float32 model (the GPU parity
tests, a user's `dtype="float32"`) doubles every K/V tile, and a head_dim that pads up to the
next power of two (80 -> 128) doubles it again, so the same tiles can ask for more shared memory
than the SM has (Triton then fails at launch with OutOfResources: 262144 > 232448 on H200).
The estimate below counts what the pipelined loop keeps resident: num_stages copies of one K
and one V tile, plus the query tile; the shrink order gives up pipelining depth first (least
speed lost), then key-tile width, then query rows.
"""

from __future__ import annotations

import torch

# Triton's own scratch (layout conversions, the softmax row state) lives beside the tiles.
_HEADROOM = 0.8
_SHARED: dict[int, int] = {}


def shared_memory_bytes(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SHARED:
        props = torch.cuda.get_device_properties(idx)
        # The opt-in maximum is what Triton may claim per block (227 KiB on Hopper).
        _SHARED[idx] = int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)
    return _SHARED[idx]


def tile_bytes(cfg: dict, rows_m: int, d_pad: int, elt: int) -> int:
    return (cfg["num_stages"] * 2 * cfg["BLOCK_N"] + rows_m) * d_pad * elt


def fit_shared_memory(
    cfg: dict, d_pad: int, elt: int, limit: int, rows_m: int | None = None, min_rows_m: int = 16
) -> dict:
    """cfg (BLOCK_N, num_stages, optionally BLOCK_M) shrunk until its tiles fit `limit` bytes.

    rows_m: the query rows of a program when it is not cfg["BLOCK_M"] (decode: the padded group).
    """
    cfg = dict(cfg)
    budget = int(limit * _HEADROOM)

    def rows() -> int:
        return rows_m if rows_m is not None else cfg.get("BLOCK_M", 16)

    while tile_bytes(cfg, rows(), d_pad, elt) > budget:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif cfg["num_stages"] > 1:
            cfg["num_stages"] -= 1
        elif rows_m is None and cfg.get("BLOCK_M", 0) > min_rows_m:
            cfg["BLOCK_M"] //= 2
        else:
            break  # the smallest tiles: let Triton say what it needs
    return cfg
