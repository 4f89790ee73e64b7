"""CUDA graphs for decode-only steps.

A decode step of a large model is hundreds of small kernel launches whose CPU cost would
exceed the GPU time at small batches; replaying one captured graph removes it. Graphs are
captured for a ladder of batch sizes up to max_num_seqs, all sharing one memory pool; a step
is padded up to the nearest captured size (padded rows write no KV: slot -1).

`GraphInputs` (the static, padded inputs a graph reads) is device-agnostic, and
`DecodeGraphs(runner, capture=False)` runs the model eagerly on those same padded inputs
instead of replaying: the CPU tests drive the whole graph-input path that way."""

from __future__ import annotations

import torch

from fastserve.layers.attention import PAD_SLOT_ID, AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class GraphInputs:
    """Static host + device input buffers of the decode graphs, [max_bs] per token array and
    [max_bs, max_blocks] for the block tables (decode: one token per row). A step fills rows
    0..bs and pads bs..g: token 0, position 0, slot PAD_SLOT_ID (no KV write), length 1,
    block table 0 (a valid block id, read but never used past length 1)."""

    def __init__(
        self, max_bs: int, max_blocks: int, max_seq_len: int, device: torch.device, pin_memory: bool | None = None
    ):
        pin = torch.device(device).type == "cuda" if pin_memory is None else pin_memory

        def pair(shape, dtype):
            return (torch.zeros(shape, dtype=dtype, pin_memory=pin), torch.zeros(shape, dtype=dtype, device=device))

        self.max_bs = max_bs
        self.max_seq_len = max_seq_len
        self.input_ids = pair(max_bs, torch.int64)
        self.positions = pair(max_bs, torch.int64)
        self.slot_mapping = pair(max_bs, torch.int64)
        self.seq_lens = pair(max_bs, torch.int32)
        self.block_tables = pair((max_bs, max_blocks), torch.int32)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.slot_mapping[1].fill_(PAD_SLOT_ID)
        self.seq_lens[1].fill_(1)

    def meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[1][:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[1][:bs],
            block_tables=self.block_tables[1][:bs],
            num_decodes=bs,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )

    def args(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) of padded size bs, as the model takes them."""
        return self.input_ids[1][:bs], self.positions[1][:bs], self.meta(bs)

    def load(self, batch, g: int) -> None:
        """Copies a decode-only batch's rows into 0..num_seqs and pads up to g."""
        bs = batch.num_seqs
        if not bs <= g <= self.max_bs or batch.num_decodes != bs:
            raise ValueError(
                f"GraphInputs.load: {bs} rows ({batch.num_decodes} decodes) into a graph of {g} "
                f"(at most {self.max_bs}, decode-only)"
            )
        mb = batch.block_tables.shape[1]
        for (host, dev), arr, pad in (
            (self.input_ids, batch.input_ids, 0),
            (self.positions, batch.positions, 0),
            (self.slot_mapping, batch.slot_mapping, PAD_SLOT_ID),
            (self.seq_lens, batch.seq_lens, 1),
        ):
            h = host.numpy()
            h[:bs] = arr
            h[bs:g] = pad
            dev[:g].copy_(host[:g], non_blocking=True)
        host, dev = self.block_tables
        h = host.numpy()
        h[:bs, :mb] = batch.block_tables
        h[bs:g, :mb] = 0
        dev[:g, :mb].copy_(host[:g, :mb], non_blocking=True)


class DecodeGraphs:
    def __init__(self, runner, capture: bool = True):
        self.runner = runner
        self.sizes = capture_sizes(runner.max_num_seqs)
        self.inputs = GraphInputs(self.sizes[-1], runner.max_blocks_per_seq, runner.config.max_model_len, runner.device)
        self.captured = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        model, kv = self.runner.model, self.runner.kv_caches
        pool = None
        for bs in reversed(self.sizes):
            args = (*self.inputs.args(bs), kv)
            model(*args)  # warm-up: Triton compiles/autotunes outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, batch) -> bool:
        return batch.num_seqs <= self.sizes[-1]

    def run(self, batch) -> torch.Tensor:
        bs = batch.num_seqs
        g = next(s for s in self.sizes if s >= bs)
        self.inputs.load(batch, g)
        if self.captured:
            self.graphs[g].replay()
            return self.outputs[g][:bs]
        return self.runner.model(*self.inputs.args(g), self.runner.kv_caches)[:bs]


__all__ = ["DecodeGraphs", "GraphInputs", "capture_sizes"]
