"""The per-step limits and the fixed-size buffers sized from them.

Every buffer a step's arrays are copied into has a fixed size, and each size comes from a
limit the scheduler enforces (it defers work to the next step rather than exceed one; see
`SchedulerConfig` in rust/src/scheduler/mod.rs). This table is the one list of them:

| buffer (owner)                                  | shape                               | safe because                                  |
|-------------------------------------------------|-------------------------------------|-----------------------------------------------|
| input_ids, positions, slot_mapping (StepBuffers)| [max_num_batched_tokens] i64        | tokens per step <= max_num_batched_tokens     |
| query_start_loc (StepBuffers)                   | [max_num_seqs + 1] i32              | rows per step <= max_num_seqs                 |
| seq_lens (StepBuffers)                          | [max_num_seqs] i32                  | rows per step <= max_num_seqs                 |
| block_tables (StepBuffers)                      | [max_num_seqs, max_blocks_per_seq]  | a sequence never passes max_model_len         |
| logits_indices (StepBuffers)                    | [max_num_sample_rows] i64           | sample rows per step <= max_num_sample_rows   |
| decode-graph inputs (cuda_graphs.GraphInputs)   | [max_num_seqs] / [.., max_blocks]   | decode-only steps; rows <= max_num_seqs       |
| logits and sampler scratch (allocated per step) | [S, vocab], S <= max_num_sample_rows| profiled at start (ModelRunner._profile_peak) |
| prompt-logprob logits (allocated per chunk)     | [<= max_num_sample_rows, vocab]     | rows taken in chunks of the sample-row limit  |

What no step limit bounds grows instead: the sampler's staging buffer (worker/staging.py)
holds each sample row's parameters plus its penalty token lists (prompt + output, up to
max_model_len per penalized row) and ban lists (min_tokens' EOS/stop ids and bad_words, up to
the request limits in fastserve/limits.py per row); it doubles when a step needs more.

`StepBuffers.check(batch)` compares a Batch with every capacity above before anything is
copied, so a bound the scheduler failed to keep is a `StepLimitError` naming the first row
past it (the engine drops the step and fails that row's request alone), not a numpy
broadcast error in the middle of a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastserve.errors import StepLimitError
from fastserve.limits import MAX_N


@dataclass(frozen=True)
class StepLimits:
    """The scheduler's per-step limits; the worker sizes its buffers from the same object."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_num_sample_rows: int
    max_model_len: int
    block_size: int

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.block_size)

    @classmethod
    def from_args(cls, args, max_model_len: int) -> StepLimits:
        """max_num_sample_rows defaults to max_num_seqs one-sample rows plus one request of the
        largest n / best_of the server admits finishing its prompt (MAX_N)."""
        rows = args.max_num_sample_rows or args.max_num_seqs + MAX_N
        return cls(args.max_num_batched_tokens, args.max_num_seqs, rows, max_model_len, args.block_size)

    def scheduler_kwargs(self) -> dict:
        return dict(
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_num_sample_rows=self.max_num_sample_rows,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
        )


def batch_shapes(batch) -> dict:
    return {
        "num_seqs": batch.num_seqs,
        "num_tokens": batch.num_tokens,
        "num_samples": batch.num_samples,
        "num_decodes": batch.num_decodes,
        "block_tables": tuple(batch.block_tables.shape),
        "max_seq_len": batch.max_seq_len,
    }


def check_batch(batch, limits: StepLimits) -> None:
    """StepLimitError when `batch` exceeds a buffer sized from `limits` (see the table)."""
    if batch.num_tokens > limits.max_num_batched_tokens:
        row = int(np.searchsorted(batch.query_start_loc[1:], limits.max_num_batched_tokens, side="right"))
        raise StepLimitError("tokens", batch.num_tokens, limits.max_num_batched_tokens, row, batch_shapes(batch))
    if batch.num_seqs > limits.max_num_seqs:
        raise StepLimitError("rows", batch.num_seqs, limits.max_num_seqs, limits.max_num_seqs, batch_shapes(batch))
    if batch.num_samples > limits.max_num_sample_rows:
        row = _row_of_sample(batch, limits.max_num_sample_rows)
        raise StepLimitError("sample rows", batch.num_samples, limits.max_num_sample_rows, row, batch_shapes(batch))
    if batch.block_tables.shape[1] > limits.max_blocks_per_seq:
        row = int(np.argmax(batch.seq_lens))
        raise StepLimitError(
            "blocks per table", batch.block_tables.shape[1], limits.max_blocks_per_seq, row, batch_shapes(batch)
        )


def _row_of_sample(batch, sample: int) -> int:
    """The sequence row whose logits row `sample` reads: logits_indices are token indices,
    so the row is the one whose tokens contain it."""
    token = int(batch.logits_indices[sample])
    return int(np.searchsorted(batch.query_start_loc[1:], token, side="right"))


class StepBuffers:
    """Persistent host + device buffers for a Batch's model-input arrays, sized from the step
    limits. Host buffers are pinned on CUDA (the copies to the device are asynchronous); on
    CPU the same copies run between plain tensors, so CPU tests exercise this path."""

    def __init__(self, limits: StepLimits, device: torch.device, pin_memory: bool | None = None):
        self.limits = limits
        self.device = torch.device(device)
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory

        def pair(shape, dtype):
            return (torch.zeros(shape, dtype=dtype, pin_memory=pin), torch.zeros(shape, dtype=dtype, device=device))

        t, s = limits.max_num_batched_tokens, limits.max_num_seqs
        self.input_ids = pair(t, torch.int64)
        self.positions = pair(t, torch.int64)
        self.slot_mapping = pair(t, torch.int64)
        self.query_start_loc = pair(s + 1, torch.int32)
        self.seq_lens = pair(s, torch.int32)
        self.block_tables = pair((s, limits.max_blocks_per_seq), torch.int32)
        self.logits_indices = pair(limits.max_num_sample_rows, torch.int64)

    def check(self, batch) -> None:
        check_batch(batch, self.limits)

    @staticmethod
    def load(buf: tuple[torch.Tensor, torch.Tensor], array: np.ndarray) -> torch.Tensor:
        """Copies `array` into the head of the buffer pair; returns the device view. The
        batch must have passed check(): a larger array is a bug, raised as numpy's error."""
        host, dev = buf
        if array.ndim == 2:
            rows, cols = array.shape
            h = host[:rows, :cols]
            h.numpy()[...] = array
            d = dev[:rows, :cols]
            d.copy_(h, non_blocking=True)
            return d
        n = array.shape[0]
        host[:n].numpy()[...] = array
        d = dev[:n]
        d.copy_(host[:n], non_blocking=True)
        return d


__all__ = ["StepBuffers", "StepLimits", "batch_shapes", "check_batch"]
