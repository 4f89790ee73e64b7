"""Token embedding and LM head, vocabulary-parallel.

Each rank holds a contiguous slice of ceil(vocab / tp) rows; the last slice is zero-padded.
The LM head gathers the slices and trims the padding so logits always have exactly the
model's `vocab_size` columns, as HF's do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastserve.distributed.parallel_state import tp_rank_and_size
from fastserve.layers import cpu_gemm


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size()
        self.num_embeddings = num_embeddings
        self.per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.per_rank * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if (
            loaded_weight.dim() != 2
            or loaded_weight.size(1) != param.size(1)
            or loaded_weight.size(0) != self.num_embeddings
        ):
            raise ValueError(
                f"embedding shape mismatch: checkpoint has {tuple(loaded_weight.shape)}, model expects "
                f"({self.num_embeddings}, {param.size(1)}) (vocab_size, hidden_size) from config.json"
            )
        rows = loaded_weight[self.vocab_start : self.vocab_start + self.per_rank]
        param.data[: rows.size(0)].copy_(rows)
        param.data[rows.size(0) :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.per_rank)
        y = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """hidden[S, H] -> float32 logits[S, vocab_size]."""

    # Set by layers/cpu_gemm.py on a float32 CPU model: the weight in oneDNN's packed layout.
    onednn_weight: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.onednn_weight is not None:
            logits = cpu_gemm.linear(hidden, self.onednn_weight, None)
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.num_embeddings].float()
