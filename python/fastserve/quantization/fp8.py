"""FP8 W8A8: `quant_method: fp8` checkpoints (AutoFP8 / vLLM Fp8Config), compressed-tensors
float-quantized (shared method), block-wise FP8 (`weight_block_size`, DeepSeek-V3 / Qwen3-FP8),
and `quantization="fp8"` on an unquantized checkpoint (weights quantized at load per output
channel, activations per token at run time, as vLLM does).

Per-tensor scales of a fused layer (q/k/v, gate/up: one scale per checkpoint Linear) become
per-channel scales (each shard's scale repeated over its rows): exact, no requantization. Their
static input scales (the parts see the same input, so calibration gives them equal scales) are
merged by taking the largest, as vLLM does."""

from __future__ import annotations

import torch

from fastserve.kernels.quant_fp8 import FP8_DTYPE, FP8_MAX, fp8_block_linear, fp8_linear
from fastserve.quantization.base import QuantConfig, make_param, matches_module_list, replace_with_buffers
from fastserve.quantization.unquantized import UnquantizedLinearMethod


class Fp8Config(QuantConfig):
    name = "fp8"

    def __init__(
        self,
        serialized: bool = True,
        activation_scheme: str = "dynamic",
        weight_block_size: list[int] | None = None,
        ignored_layers: list[str] | None = None,
    ):
        if activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme {activation_scheme!r} must be 'dynamic' or 'static'")
        if weight_block_size is not None and (len(weight_block_size) != 2 or min(weight_block_size) <= 0):
            raise ValueError(
                f"fp8 weight_block_size {weight_block_size!r} must be two positive ints [block_n, block_k]"
            )
        if weight_block_size is not None and activation_scheme != "dynamic":
            raise ValueError("block-wise fp8 (weight_block_size) needs activation_scheme 'dynamic'")
        self.serialized, self.activation_scheme = serialized, activation_scheme
        self.block = tuple(int(b) for b in weight_block_size) if weight_block_size else None
        self.ignored_layers = list(ignored_layers or [])

    @classmethod
    def from_config(cls, cfg: dict) -> Fp8Config:
        return cls(
            True,
            str(cfg.get("activation_scheme", "dynamic")),
            cfg.get("weight_block_size"),
            cfg.get("ignored_layers") or cfg.get("modules_to_not_convert"),
        )

    @classmethod
    def on_load(cls) -> Fp8Config:
        return cls(serialized=False)

    def describe(self) -> str:
        if not self.serialized:
            return "fp8 quantized at load, per-channel weights, dynamic activations"
        if self.block:
            return f"fp8 block {self.block[0]}x{self.block[1]}"
        return f"fp8 per-tensor, {self.activation_scheme} activations"

    def get_linear_method(self, layer, prefix: str):
        if matches_module_list(prefix, self.ignored_layers):
            return None
        if not self.serialized:
            return Fp8OnLoadMethod()
        if self.block:
            return Fp8BlockMethod(self.block)
        return Fp8LinearMethod("tensor", self.activation_scheme == "static")


class Fp8LinearMethod:
    """weight float8_e4m3fn [N, K]; weight_scale per tensor (one per fused shard) or per channel
    [N, 1]; input_scale per tensor when static."""

    def __init__(self, strategy: str, static_input: bool, ignored: tuple[str, ...] = ()):
        if strategy not in ("tensor", "channel"):
            raise ValueError(f"fp8 weight strategy {strategy!r} is not supported (tensor, channel are)")
        self.strategy, self.static_input = strategy, static_input
        self.ignored = ignored  # tensors some exporters write that carry nothing (symmetric zero points)

    def check_shapes(self, prefix, k_local, k_full, parts_local, kind, tp) -> None:
        pass  # any split of an [N, K] float8 matrix works

    def create_weights(self, layer) -> None:
        n, k = layer.output_size, layer.input_size
        shards = len(layer.output_partition_sizes)
        make_param(layer, "weight", (n, k), FP8_DTYPE, output_dim=0, input_dim=1)
        if self.strategy == "tensor":
            make_param(layer, "weight_scale", (shards,), torch.float32, shard_scalar=True)
        else:
            make_param(layer, "weight_scale", (n, 1), torch.float32, output_dim=0)
        if self.static_input:
            make_param(layer, "input_scale", (shards,), torch.float32, shard_scalar=True)
        for name in self.ignored:
            make_param(layer, name, (0,), torch.float32, optional=True).weight_loader = _ignore

    def process_weights_after_loading(self, layer) -> None:
        for name in self.ignored:
            del layer._parameters[name]
        ws = layer.weight_scale.data.float().reshape(-1)
        if self.strategy == "tensor" and ws.numel() > 1:
            if bool((ws == ws[0]).all()):
                ws = ws[:1]
            else:
                sizes = torch.tensor(layer.output_partition_sizes, device=ws.device)
                ws = ws.repeat_interleave(sizes)
        input_scale = layer.input_scale.data.float().max().reshape(1) if self.static_input else None
        replace_with_buffers(layer, [], weight=layer.weight.data, weight_scale=ws, input_scale=input_scale)

    def apply(self, layer, x, bias):
        return fp8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, bias)

    def init_dummy(self, layer, generator) -> None:
        layer.weight.data.copy_(_dummy_fp8(layer.weight.shape, layer.weight.device, generator))
        layer.weight_scale.data.fill_(0.02 / FP8_MAX)
        if self.static_input:
            layer.input_scale.data.fill_(8.0 / FP8_MAX)


class Fp8BlockMethod:
    """weight float8_e4m3fn [N, K], weight_scale_inv float32 [ceil(N / bn), ceil(K / bk)]."""

    def __init__(self, block: tuple[int, int]):
        self.block = block

    def check_shapes(self, prefix, k_local, k_full, parts_local, kind, tp) -> None:
        bn, bk = self.block
        split = f"tensor_parallel_size={tp}: " if tp > 1 else ""
        if len(parts_local) > 1 or (kind == "column" and tp > 1):
            for n in parts_local:
                if n % bn:
                    raise ValueError(
                        f"{prefix}: {split}output dimension {n} per rank (per fused part) is not a "
                        f"multiple of the fp8 weight block {bn} (weight_block_size {list(self.block)})"
                    )
        if kind == "row" and tp > 1 and k_local % bk:
            raise ValueError(
                f"{prefix}: {split}input dimension K={k_full} / {tp} = {k_local} per rank is not a "
                f"multiple of the fp8 weight block {bk} (weight_block_size {list(self.block)})"
            )

    def create_weights(self, layer) -> None:
        kind = "row" if layer.tp_dim == 1 else "column"
        self.check_shapes(
            layer.prefix,
            layer.input_size,
            layer.input_size * layer.tp_size,
            layer.output_partition_sizes,
            kind,
            layer.tp_size,
        )
        n, k = layer.output_size, layer.input_size
        bn, bk = self.block
        make_param(layer, "weight", (n, k), FP8_DTYPE, output_dim=0, input_dim=1)
        make_param(
            layer, "weight_scale_inv", (-(-n // bn), -(-k // bk)), torch.float32, output_dim=0, input_dim=1, pack_out=bn
        )

    def process_weights_after_loading(self, layer) -> None:
        replace_with_buffers(layer, [], weight=layer.weight.data, weight_scale_inv=layer.weight_scale_inv.data.float())

    def apply(self, layer, x, bias):
        return fp8_block_linear(x, layer.weight, layer.weight_scale_inv, self.block, bias)

    def init_dummy(self, layer, generator) -> None:
        layer.weight.data.copy_(_dummy_fp8(layer.weight.shape, layer.weight.device, generator))
        layer.weight_scale_inv.data.fill_(0.02 / FP8_MAX)


class Fp8OnLoadMethod(UnquantizedLinearMethod):
    """A model-dtype checkpoint quantized after loading: per-output-channel scales (amax / 448),
    dynamic per-token activations."""

    def check_shapes(self, prefix, k_local, k_full, parts_local, kind, tp) -> None:
        pass

    def process_weights_after_loading(self, layer) -> None:
        w = layer.weight.data.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
        wq = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        del w
        replace_with_buffers(layer, ["weight"], weight=wq, weight_scale=scale)

    def apply(self, layer, x, bias):
        return fp8_linear(x, layer.weight, layer.weight_scale, None, bias)


def _dummy_fp8(shape, device, generator) -> torch.Tensor:
    return (torch.rand(shape, device=device, generator=generator) * 2 - 1).mul_(FP8_MAX).to(FP8_DTYPE)


def _ignore(param, loaded_weight, shard_id=None) -> None:
    pass
