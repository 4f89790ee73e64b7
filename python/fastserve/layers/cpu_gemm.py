"""float32 matmuls on the CPU through oneDNN, each weight reordered once into oneDNN's blocked
layout.

torch's `F.linear` runs float32 through MKL's sgemm, which on AMD processors takes a slow path:
on the 2-core EPYC development machine it reaches 65-180 GFLOP/s on SmolLM2's layer shapes,
oneDNN with the weight packed once 150-430 (bench/cpu_gemm.py, bench/results/cpu-gemm-epyc.json).
vLLM's CPU build does the same (a oneDNN matmul over a pre-packed weight). bfloat16 stays on
`F.linear`: torch already sends it through oneDNN, and a packed bf16 weight measured slower.

The packed tensor replaces the dense weight, so the model is not held twice; a weight another
module shares (tied embeddings: the lookup reads rows of it) is kept and packed beside it.
`FASTSERVE_CPU_GEMM=torch` keeps every layer on `F.linear` (A/B measurements, a CPU without
oneDNN's kernels).
"""

from __future__ import annotations

import os

import torch
from torch import nn

# The batch size oneDNN tunes the packed layout for. Every size is correct with any hint; 256
# measured best or within noise of the best for M = 1 ... 2048 on the shapes above.
PACK_HINT_ROWS = 256


def onednn_usable(weight: torch.Tensor | None) -> bool:
    return (
        weight is not None
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and os.environ.get("FASTSERVE_CPU_GEMM", "onednn") != "torch"
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_HINT_ROWS)


# oneDNN builds (JIT-compiles) a primitive per row count and caches it: ~0.9 ms to build, against
# 0.1-2 ms for the product itself, and ~200 KB held per entry up to 1,024 entries. Every row
# count a step can have (1 ... max_num_batched_tokens) would fill that cache (+150 MB RSS under
# the 5,000-request load test) and miss on most new counts. So row counts run in buckets: up to
# SMALL_ROWS as they are; up to CHUNK_ROWS rounded up to a multiple of ROW_STEP (small products
# stream the weight, so a few padded rows cost next to nothing); beyond, the whole multiples of
# CHUNK_ROWS as one product and the rest as above. That is at most ~60 entries per weight shape.
SMALL_ROWS = 8
ROW_STEP = 16
CHUNK_ROWS = 256


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _split(m: int) -> tuple[int, int]:
    """(rows run as one whole-chunk product, rows left for the small path)."""
    head = m - m % CHUNK_ROWS if m > CHUNK_ROWS else 0
    return head, m - head


def _small_rows(m: int) -> int:
    return m if m <= SMALL_ROWS else -(-m // ROW_STEP) * ROW_STEP


def bucket_rows(m: int) -> tuple[int, ...]:
    """The row counts oneDNN sees for an m-row product (see above)."""
    head, rest = _split(m)
    return tuple(r for r in (head, _small_rows(rest)) if r)


def _small(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m = x.shape[0]
    rows = _small_rows(m)
    if rows == m:
        return _product(x, packed, bias)
    padded = x.new_empty(rows, x.shape[1])
    padded[:m] = x
    padded[m:].zero_()
    return _product(padded, packed, bias)[:m]


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] with W packed by `pack`."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    head, rest = _split(x2.shape[0])
    if not head:
        y = _small(x2, packed, bias)
    else:
        y = _product(x2[:head], packed, bias)
        if rest:
            y = torch.cat((y, _small(x2[head:], packed, bias)))
    return y.view(*lead, y.shape[-1])


def pack_cpu_linears(model: nn.Module) -> int:
    """Packs every unquantized float32 linear weight (and the LM head) of a CPU model; returns
    how many. Run once, after loading: the dense weights of packed layers are gone after it."""
    from fastserve.layers.embedding import ParallelLMHead
    from fastserve.layers.linear import LinearBase

    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[p.data_ptr()] = uses.get(p.data_ptr(), 0) + 1
    n = 0
    for module in model.modules():
        if not (isinstance(module, LinearBase) and module.quant_method is None or isinstance(module, ParallelLMHead)):
            continue
        weight = getattr(module, "weight", None)
        if not onednn_usable(weight):
            continue
        module.onednn_weight = pack(weight.data)
        if uses.get(weight.data_ptr(), 0) == 1:
            module.weight = None
        n += 1
    return n
