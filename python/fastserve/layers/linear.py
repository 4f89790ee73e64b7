"""Linear layers that know how to load (and, under tensor parallelism, shard) their weights.

Tensor parallelism lives here, not in model code (nano-vllm's layout): every parameter has a
`weight_loader(param, loaded_weight[, shard_id])` that copies the slice this rank owns.
Packed layers (QKV, gate/up) take HF's separate tensors one shard at a time:
QKVParallelLinear with shard_id "q" / "k" / "v", MergedColumnParallelLinear with 0, 1, ...

With no process group (or a group of one) every layer is a plain `F.linear`.

Every constructor takes `quant_config` (the model's quantization config, None for an
unquantized checkpoint) and `prefix` (the layer's dotted name in the checkpoint, e.g.
"model.layers.0.self_attn.qkv_proj"), so that a quantization format can choose per module
(GPTQ `dynamic` overrides, `modules_to_not_convert`, compressed-tensors `ignore`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastserve.distributed.parallel_state import tp_rank_and_size


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """For parameters every rank holds whole (norm weights)."""
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"weight shape mismatch: checkpoint has {tuple(loaded_weight.shape)}, model expects {tuple(param.shape)}"
        )
    param.data.copy_(loaded_weight)


def _check_divisible(total: int, tp_size: int, what: str) -> int:
    if total % tp_size:
        raise ValueError(f"{what} ({total}) must be divisible by tensor_parallel_size ({tp_size})")
    return total // tp_size


class LinearBase(nn.Module):
    """y = x W^T (+ b) with W of shape [output_size, input_size] for this rank.

    `tp_dim` is the weight dimension split across ranks (0: output/column, 1: input/row,
    None: replicated)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None, *,
                 quant_config=None, prefix: str = ""):
        super().__init__()
        self.quant_config = quant_config
        self.prefix = prefix
        self.tp_rank, self.tp_size = tp_rank_and_size()
        self.tp_dim = tp_dim
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError  # each subclass defines how its rank's slice is cut

    @staticmethod
    def _narrow(src: torch.Tensor, dim: int, start: int, size: int, dst: torch.Tensor, name: str) -> torch.Tensor:
        other_ok = src.dim() == dst.dim() and all(src.size(d) == dst.size(d) for d in range(src.dim()) if d != dim)
        if not other_ok or src.size(dim) < start + size:
            raise ValueError(
                f"weight shape mismatch for {name}: checkpoint has {tuple(src.shape)}, which does not hold this "
                f"rank's slice {tuple(dst.shape)} (check config.json against the checkpoint)"
            )
        return src.narrow(dim, start, size)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"weight shape mismatch for {name}: checkpoint has {tuple(src.shape)}, model expects {tuple(dst.shape)}")
        dst.copy_(src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, quant_config=None, prefix: str = ""):
        super().__init__(input_size, output_size, bias, None, quant_config=quant_config, prefix=prefix)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        self._copy(param.data, loaded_weight, type(self).__name__)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication (the next RowParallel reduces)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, quant_config=None, prefix: str = ""):
        tp_size = tp_rank_and_size()[1]
        super().__init__(input_size, _check_divisible(output_size, tp_size, "output size"), bias, 0,
                         quant_config=quant_config, prefix=prefix)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        size = param.data.size(0)
        name = type(self).__name__
        self._copy(param.data, self._narrow(loaded_weight, 0, self.tp_rank * size, size, param.data, name), name)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, *, quant_config=None,
                 prefix: str = ""):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, quant_config=quant_config, prefix=prefix)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is None or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"MergedColumnParallelLinear needs shard_id in 0..{len(self.output_sizes) - 1}, got {shard_id!r}")
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        dst = param.data.narrow(0, offset, size)
        name = f"gate_up shard {shard_id}"
        self._copy(dst, self._narrow(loaded_weight, 0, self.tp_rank * size, size, dst, name), name)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; output laid out [q | k | v] per rank.

    KV heads are replicated when there are fewer than ranks (MQA under TP)."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int, bias: bool = False,
                 *, quant_config=None, prefix: str = ""):
        tp_rank, tp_size = tp_rank_and_size()
        self.head_dim = head_dim
        self.num_heads = _check_divisible(total_num_heads, tp_size, "num_attention_heads")
        if total_num_kv_heads >= tp_size:
            self.num_kv_heads = _check_divisible(total_num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _check_divisible(tp_size, total_num_kv_heads, "tensor_parallel_size over num_key_value_heads")
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias, quant_config=quant_config, prefix=prefix)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        elif shard_id == "k":
            offset, size, rank = q_size, kv_size, self.tp_rank // self.kv_replicas
        elif shard_id == "v":
            offset, size, rank = q_size + kv_size, kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"QKVParallelLinear needs shard_id 'q', 'k' or 'v', got {shard_id!r}")
        dst = param.data.narrow(0, offset, size)
        name = f"qkv shard {shard_id}"
        self._copy(dst, self._narrow(loaded_weight, 0, rank * size, size, dst, name), name)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, quant_config=None, prefix: str = ""):
        tp_size = tp_rank_and_size()[1]
        super().__init__(_check_divisible(input_size, tp_size, "input size"), output_size, bias, 1,
                         quant_config=quant_config, prefix=prefix)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if param.data.dim() == 1:  # the bias is added once, after the reduction
            self._copy(param.data, loaded_weight, "row-parallel bias")
            return
        size = param.data.size(1)
        name = type(self).__name__
        self._copy(param.data, self._narrow(loaded_weight, 1, self.tp_rank * size, size, param.data, name), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y
