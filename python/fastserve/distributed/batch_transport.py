"""Each step's Batch, from the driver's scheduler to the tensor-parallel workers.

No pickle: the model-input arrays of the Batch are packed into ONE int64 buffer behind a
fixed header of scalars, and sent with two gloo broadcasts (the header, whose last field is
the payload length, then the payload). Workers rebuild a `WorkerBatch` with the same
attribute names and dtypes as `fastserve._core.Batch`, so ModelRunner and DecodeGraphs read
it unchanged.

Workers get only what the forward pass and the logits all-gather need. Sampling arrays stay
in the driver: only rank 0 samples (see distributed/executor.py for why).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

# The header's first field.
CMD_STEP = 1
CMD_STOP = 2

# header: cmd, num_seqs, num_tokens, num_samples, num_decodes, max_query_len, max_seq_len,
#         block-table columns, prompt-logprob rows, payload length
_HEADER = 10

# (attribute, dtype the model runner expects); order is the payload layout.
_ARRAYS = (
    ("input_ids", np.int64),
    ("positions", np.int64),
    ("slot_mapping", np.int64),
    ("query_start_loc", np.int32),
    ("seq_lens", np.int32),
    ("block_tables", np.int32),
    ("logits_indices", np.int64),
    ("prompt_logprob_indices", np.int64),
)


class WorkerBatch:
    """The model-input half of a Batch, as a worker sees it."""

    __slots__ = (
        "num_seqs",
        "num_tokens",
        "num_samples",
        "num_decodes",
        "max_query_len",
        "max_seq_len",
        *(name for name, _ in _ARRAYS),
    )


def pack(batch) -> tuple[np.ndarray, np.ndarray]:
    """(header int64[_HEADER], payload int64[n]) for one Batch."""
    arrays = [np.asarray(getattr(batch, name)).reshape(-1) for name, _ in _ARRAYS]
    payload = np.concatenate(arrays).astype(np.int64, copy=False)
    header = np.array(
        [
            CMD_STEP,
            batch.num_seqs,
            batch.num_tokens,
            batch.num_samples,
            batch.num_decodes,
            batch.max_query_len,
            batch.max_seq_len,
            batch.block_tables.shape[1],
            batch.prompt_logprob_indices.shape[0],
            payload.shape[0],
        ],
        dtype=np.int64,
    )
    return header, payload


def unpack(header: np.ndarray, payload: np.ndarray) -> WorkerBatch:
    b = WorkerBatch()
    (_, b.num_seqs, b.num_tokens, b.num_samples, b.num_decodes, b.max_query_len, b.max_seq_len, cols, num_plp, _) = (
        int(x) for x in header
    )
    T, B, S = b.num_tokens, b.num_seqs, b.num_samples
    sizes = (T, T, T, B + 1, B, B * cols, S, num_plp)
    offset = 0
    for (name, dtype), n in zip(_ARRAYS, sizes):
        a = payload[offset : offset + n]
        setattr(b, name, a if dtype == np.int64 else a.astype(dtype))
        offset += n
    b.block_tables = b.block_tables.reshape(B, cols)
    return b


class BatchSender:
    """Driver side. send() must be called once per model step, before the driver's own
    forward pass, so every rank enters the same collectives in the same order."""

    def __init__(self, group):
        self.group = group
        # True from a step's broadcast until the driver has that step's results: a step
        # cut short (an exception, Ctrl+C) leaves the ranks inside a collective, where a
        # stop message would meet the wrong operation.
        self.step_open = False

    def stop(self) -> bool:
        """Tell every rank to exit, if they are all waiting for a batch; False otherwise
        (local ranks are then stopped through their pipes, remote ones notice the closed
        sockets when this process exits)."""
        if self.step_open:
            return False
        header = np.zeros(_HEADER, dtype=np.int64)
        header[0] = CMD_STOP
        try:
            dist.broadcast(torch.from_numpy(header), src=0, group=self.group)
        except RuntimeError:
            return False
        return True

    def send(self, batch) -> None:
        header, payload = pack(batch)
        self.step_open = True
        try:
            dist.broadcast(torch.from_numpy(header), src=0, group=self.group)
            dist.broadcast(torch.from_numpy(np.ascontiguousarray(payload)), src=0, group=self.group)
        except RuntimeError as e:  # gloo: a peer closed its socket
            raise RuntimeError(f"a tensor-parallel worker is gone (sending the step's batch failed): {e}") from e


class BatchReceiver:
    def __init__(self, group):
        self.group = group
        self.header = torch.empty(_HEADER, dtype=torch.int64)

    def recv(self) -> WorkerBatch | None:
        """The next step's batch (blocks until the driver sends one); None: stop."""
        dist.broadcast(self.header, src=0, group=self.group)
        header = self.header.numpy().copy()
        if header[0] == CMD_STOP:
            return None
        if header[0] != CMD_STEP:
            raise RuntimeError(f"unknown tensor-parallel control command {int(header[0])}")
        payload = torch.empty(int(header[-1]), dtype=torch.int64)
        dist.broadcast(payload, src=0, group=self.group)
        return unpack(header, payload.numpy())
