"""Linear layers that know how to load (and, under tensor parallelism, shard) their weights.

Tensor parallelism lives here, not in model code (nano-vllm's layout): every parameter has a
`weight_loader(param, loaded_weight[, shard_id])` that copies the slice this rank owns.
Packed layers (QKV, gate/up) take HF's separate tensors one shard at a time:
QKVParallelLinear with shard_id "q" / "k" / "v", MergedColumnParallelLinear with 0, 1, ...

With no process group (or a group of one) every layer is a plain `F.linear`.

Quantized layers (quant_config given and its `get_linear_method(layer, prefix)` not None) hold
the checkpoint's own tensors (qweight, scales, ...; fastserve/quantization/) until
`process_weights_after_loading` converts them into the kernel's layout. Each such parameter
says which of its dimensions runs along N (`output_dim`, with `pack_out` N values per element)
and along K (`input_dim`); the loaders below cut a rank's slice along that dimension, so packed
words, group scales and block scales split like the weight they belong to. A dimension of None
is loaded whole on every rank (act-order scales, per-tensor scales); `shard_scalar` parameters
hold one value per fused shard.

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
from fastserve.layers import cpu_gemm


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

    # Set by layers/cpu_gemm.py on an unquantized float32 CPU layer: the weight in oneDNN's
    # packed layout, in place of `weight`.
    onednn_weight: torch.Tensor | None = None

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp_dim: int | None, *, quant_config=None, prefix: str = ""
    ):
        super().__init__()
        self.quant_config = quant_config
        self.prefix = prefix
        self.tp_rank, self.tp_size = tp_rank_and_size()
        self.tp_dim = tp_dim
        self.input_size = input_size
        self.output_size = output_size
        self.params_dtype = torch.get_default_dtype()
        self.output_partition_sizes = self._partition_sizes()
        self.quant_method = quant_config.get_linear_method(self, prefix) if quant_config is not None else None
        if self.quant_method is None:
            self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        else:
            self.quant_method.create_weights(self)
        if bias:
            # Biases stay in the model dtype whatever the weights' format (Qwen2's q/k/v bias).
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _partition_sizes(self) -> list[int]:
        """This rank's output size of each fused part (one part unless fused)."""
        return [self.output_size]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        self._load(param, loaded_weight, shard_id)
        param.loaded = True

    def _load(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError  # each subclass defines how its rank's slice is cut

    @staticmethod
    def _out_dim(param) -> int | None:
        return getattr(param, "output_dim", 0)

    @staticmethod
    def _in_dim(param) -> int | None:
        return getattr(param, "input_dim", 1 if param.dim() == 2 else None)

    @staticmethod
    def _load_shard_scalar(param, loaded_weight: torch.Tensor, index: int, name: str) -> None:
        if loaded_weight.numel() != 1:
            raise ValueError(
                f"weight shape mismatch for {name}: checkpoint has {tuple(loaded_weight.shape)}, "
                "model expects a per-tensor scale (one value)"
            )
        param.data[index] = loaded_weight.reshape(())

    @staticmethod
    def _load_whole_shared(param, loaded_weight: torch.Tensor, name: str) -> None:
        """A tensor every fused part has whole (g_idx): the parts must agree, they share one matmul."""
        if (
            getattr(param, "loaded", False)
            and param.data.shape == loaded_weight.shape
            and not torch.equal(param.data, loaded_weight.to(param.dtype))
        ):
            raise ValueError(
                f"{name}: the fused parts have different {tuple(loaded_weight.shape)} tensors (e.g. "
                "act-order g_idx); they must be equal to run as one matmul"
            )
        LinearBase._copy(param.data, loaded_weight, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        if self.onednn_weight is not None:
            return cpu_gemm.linear(x, self.onednn_weight, self.bias)
        return F.linear(x, self.weight, self.bias)

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
            raise ValueError(
                f"weight shape mismatch for {name}: checkpoint has {tuple(src.shape)}, model expects {tuple(dst.shape)}"
            )
        dst.copy_(src)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, quant_config=None, prefix: str = ""):
        super().__init__(input_size, output_size, bias, None, quant_config=quant_config, prefix=prefix)

    def _load(self, param, loaded_weight, shard_id=None):
        if getattr(param, "shard_scalar", False):
            return self._load_shard_scalar(param, loaded_weight, 0, type(self).__name__)
        self._copy(param.data, loaded_weight, type(self).__name__)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication (the next RowParallel reduces)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, quant_config=None, prefix: str = ""):
        tp_size = tp_rank_and_size()[1]
        super().__init__(
            input_size,
            _check_divisible(output_size, tp_size, "output size"),
            bias,
            0,
            quant_config=quant_config,
            prefix=prefix,
        )

    def _load(self, param, loaded_weight, shard_id=None):
        name = type(self).__name__
        if getattr(param, "shard_scalar", False):
            return self._load_shard_scalar(param, loaded_weight, 0, name)
        d = self._out_dim(param)
        if d is None:
            return self._copy(param.data, loaded_weight, name)
        size = param.data.size(d)
        self._copy(param.data, self._narrow(loaded_weight, d, self.tp_rank * size, size, param.data, name), name)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_up_proj)."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, *, quant_config=None, prefix: str = ""
    ):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, quant_config=quant_config, prefix=prefix)

    def _partition_sizes(self) -> list[int]:
        return [s // self.tp_size for s in self.output_sizes]

    def _load(self, param, loaded_weight, shard_id=None):
        if shard_id is None or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"MergedColumnParallelLinear needs shard_id in 0..{len(self.output_sizes) - 1}, got {shard_id!r}"
            )
        name = f"gate_up shard {shard_id}"
        if getattr(param, "shard_scalar", False):
            return self._load_shard_scalar(param, loaded_weight, shard_id, name)
        d = self._out_dim(param)
        if d is None:
            return self._load_whole_shared(param, loaded_weight, name)
        pack = getattr(param, "pack_out", 1)
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size // pack
        size = self.output_sizes[shard_id] // self.tp_size // pack
        dst = param.data.narrow(d, offset, size)
        self._copy(dst, self._narrow(loaded_weight, d, self.tp_rank * size, size, dst, name), name)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; output laid out [q | k | v] per rank.

    KV heads are replicated when there are fewer than ranks (MQA under TP)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        *,
        quant_config=None,
        prefix: str = "",
    ):
        tp_rank, tp_size = tp_rank_and_size()
        self.head_dim = head_dim
        self.num_heads = _check_divisible(total_num_heads, tp_size, "num_attention_heads")
        if total_num_kv_heads >= tp_size:
            self.num_kv_heads = _check_divisible(total_num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _check_divisible(
                tp_size, total_num_kv_heads, "tensor_parallel_size over num_key_value_heads"
            )
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias, quant_config=quant_config, prefix=prefix)

    def _partition_sizes(self) -> list[int]:
        kv = self.num_kv_heads * self.head_dim
        return [self.num_heads * self.head_dim, kv, kv]

    def _load(self, param, loaded_weight, shard_id=None):
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
        name = f"qkv shard {shard_id}"
        if getattr(param, "shard_scalar", False):
            return self._load_shard_scalar(param, loaded_weight, "qkv".index(shard_id), name)
        d = self._out_dim(param)
        if d is None:
            return self._load_whole_shared(param, loaded_weight, name)
        pack = getattr(param, "pack_out", 1)
        offset, size = offset // pack, size // pack
        dst = param.data.narrow(d, offset, size)
        self._copy(dst, self._narrow(loaded_weight, d, rank * size, size, dst, name), name)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, quant_config=None, prefix: str = ""):
        tp_size = tp_rank_and_size()[1]
        super().__init__(
            _check_divisible(input_size, tp_size, "input size"),
            output_size,
            bias,
            1,
            quant_config=quant_config,
            prefix=prefix,
        )

    def _load(self, param, loaded_weight, shard_id=None):
        name = type(self).__name__
        if getattr(param, "shard_scalar", False):
            return self._load_shard_scalar(param, loaded_weight, 0, name)
        d = self._in_dim(param)
        if d is None:  # the bias (added once, after the reduction), replicated scales
            self._copy(param.data, loaded_weight, f"row-parallel {name}")
            return
        size = param.data.size(d)
        self._copy(param.data, self._narrow(loaded_weight, d, self.tp_rank * size, size, param.data, name), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        if self.quant_method is not None:
            y = self.quant_method.apply(self, x, bias)
        elif self.onednn_weight is not None:
            y = cpu_gemm.linear(x, self.onednn_weight, bias)
        else:
            y = F.linear(x, self.weight, bias)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y
