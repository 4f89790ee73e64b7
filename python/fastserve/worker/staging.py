"""Staging: a step's many small host arrays to the device in one copy.

The sampler needs about twenty small arrays a step (temperatures, seeds, penalty lists...).
Copied one by one from pageable numpy memory, each is a separate driver call through a
bounce buffer, and the CPU waits on them between kernel launches. Here they are laid end to
end in one pinned buffer and moved with one asynchronous copy; the tensors handed back are
typed views into one device buffer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Every array starts at a multiple of this, so a byte view can be viewed as any dtype.
_ALIGN = 64

_TORCH_DTYPES = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.uint8): torch.uint8,
}


class PinnedStaging:
    """One host buffer (pinned on CUDA) and one device buffer, reused every step.

    `to_device` may be called once per step: its host buffer is rewritten by the next call,
    so the copy it starts must have finished by then. The model runner's step ends with a
    device-to-host copy of the sampled ids on the same stream, which waits for it."""

    def __init__(self, device: torch.device, capacity: int = 1 << 16):
        self.device = torch.device(device)
        self._allocate(capacity)

    def _allocate(self, nbytes: int) -> None:
        pin = self.device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self._host_np = self.host.numpy()
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    @property
    def capacity(self) -> int:
        return self.host.numel()

    def to_device(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            if a.dtype not in _TORCH_DTYPES:
                raise ValueError(f"cannot stage a {a.dtype} array: use one of {sorted(map(str, _TORCH_DTYPES))}")
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        if total > self.capacity:
            # Tensors of earlier steps keep their own (old) storage alive; nothing is lost.
            self._allocate(1 << (total - 1).bit_length())
        for a, off in zip(arrays, offsets):
            if a.nbytes:
                self._host_np[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
        if total:
            self.dev[:total].copy_(self.host[:total], non_blocking=True)
        return [
            self.dev[off : off + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape) for a, off in zip(arrays, offsets)
        ]
