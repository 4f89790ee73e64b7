"""CUDA graphs for decode-only steps.

A decode step of a large model is hundreds of small kernel launches whose CPU cost would
exceed the GPU time at small batches; replaying one captured graph removes it. Graphs are
captured for a ladder of batch sizes up to max_num_seqs, all sharing one memory pool; a step
is padded up to the nearest captured size (padded rows write no KV: slot -1)."""

from __future__ import annotations

import torch

from fastserve.layers.attention import PAD_SLOT_ID, AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, runner):
        self.runner = runner
        device = runner.device
        self.sizes = capture_sizes(runner.max_num_seqs)
        max_bs = self.sizes[-1]
        max_blocks = runner.max_blocks_per_seq
        self.max_seq_len = runner.config.max_model_len

        def pair(shape, dtype):
            return (torch.zeros(shape, dtype=dtype, pin_memory=True), torch.zeros(shape, dtype=dtype, device=device))

        self.input_ids = pair(max_bs, torch.int64)
        self.positions = pair(max_bs, torch.int64)
        self.slot_mapping = pair(max_bs, torch.int64)
        self.seq_lens = pair(max_bs, torch.int32)
        self.block_tables = pair((max_bs, max_blocks), torch.int32)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[1][:bs], query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[1][:bs], block_tables=self.block_tables[1][:bs],
            num_decodes=bs, max_query_len=1, max_seq_len=self.max_seq_len,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        model, kv = self.runner.model, self.runner.kv_caches
        self.slot_mapping[1].fill_(PAD_SLOT_ID)
        self.seq_lens[1].fill_(1)
        pool = None
        for bs in reversed(self.sizes):
            args = (self.input_ids[1][:bs], self.positions[1][:bs], self._meta(bs), kv)
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
        self.graphs[g].replay()
        return self.outputs[g][:bs]


__all__ = ["DecodeGraphs", "capture_sizes"]
