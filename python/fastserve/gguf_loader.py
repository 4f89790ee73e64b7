"""GGUF checkpoints (llama.cpp's one-file format): `--model file.gguf`, `LLM(model="x.gguf")`.

The header is parsed by gguf_file.py; quantized tensors are dequantized by the `gguf`
package (a dependency; F32/F16/BF16 files do not need it). Everything
the engine needs comes from the one file:
- the config.json equivalent from the GGUF metadata (`hf_config`),
- the weights under their Hugging Face names, dequantized at load to float32 (F16/BF16 stay
  as they are) and cast by each parameter's loader to the model dtype (`iterate_gguf_weights`),
- the tokenizer and chat template from `tokenizer.ggml.*` (gguf_tokenizer.py).

Quantized blocks are not kept: a Q4_1 file runs as an unquantized model of the same
weights (what transformers does with `gguf_file=`), so outputs equal transformers' on the
same file, and the memory is that of an fp32/bf16 checkpoint.

llama.cpp's converter permutes the q/k projection rows of the `llama` architecture (its
rotary pairs adjacent channels, HF's pairs the two halves of each head); the rows are put
back here (`_reverse_permute`). qwen2/qwen3 files are written unpermuted.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from fastserve.gguf_file import GGUFFile, TensorInfo

logger = logging.getLogger("fastserve")

GGUF_MAGIC = b"GGUF"

# GGUF `general.architecture` -> (HF architecture, q/k rows permuted by llama.cpp's converter).
# Mistral files are written as `llama`.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}

# Tensor types we load; each is covered by tests/test_gguf.py against transformers' own
# GGUF loading. The rest of gguf.quants (IQ*, TQ*, MXFP4, ...) is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF block-tensor suffix -> HF module path inside `model.layers.{i}.`
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Consumed by hf_config (llama3-style rope factors), not a parameter.
_CONFIG_TENSORS = ("rope_freqs.weight",)


def _require_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ValueError(
            "dequantizing a quantized .gguf model needs the `gguf` package: "
            "pip install 'fastserve[gguf]' (or pip install gguf)"
        ) from e
    return gguf


def is_gguf(path: str | os.PathLike | None) -> bool:
    """A GGUF file: a regular file named *.gguf or starting with the GGUF magic."""
    if path is None:
        return False
    p = os.fspath(path)
    if not os.path.isfile(p):
        return False
    if p.lower().endswith(".gguf"):
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@functools.lru_cache(maxsize=4)
def _reader(real_path: str, size: int, mtime_ns: int) -> GGUFFile:
    t0 = time.perf_counter()
    reader = GGUFFile(real_path)
    logger.debug("parsed the GGUF header of %s in %.2f s", real_path, time.perf_counter() - t0)
    return reader


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed GGUF file (memory-mapped); parsed once per process per file version, as
    the config, the tokenizer and the weights all read it."""
    real = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(real)
    except OSError as e:
        raise ValueError(f"GGUF file {os.fspath(path)!r} cannot be opened: {e}") from e
    return _reader(real, st.st_size, st.st_mtime_ns)


def field_value(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """A metadata value (str, int, float, bool, or a list of them), `default` when absent."""
    return reader.fields.get(key, default)


def architecture(reader) -> str:
    arch = field_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported: supported are {sorted(ARCHITECTURES)} "
            "(Llama 2/3, Mistral, SmolLM, Qwen2/2.5, Qwen3 files)"
        )
    return arch


def _hf_layer_name(gguf_name: str) -> str | None:
    """HF name of a GGUF tensor; None for tensors that are not parameters."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name in _CONFIG_TENSORS:
        return None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no counterpart in fastserve's models (a mixture-of-experts "
        "or otherwise unsupported variant of the architecture)"
    )


def _llama3_rope_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """rope_scaling for a `rope_freqs` tensor (what llama.cpp's converter writes for Llama 3.1+
    instead of metadata): one divisor per rotary frequency, 1 for high frequencies, `factor`
    for low ones, smoothly in between. The three llama3 parameters other than `factor` are
    only determined up to a common scale (the divisors depend on them through two ratios), so
    low_freq_factor is taken as 1 (every Llama 3.x) and the others solved from the smooth
    band; the result is checked by recomputing the divisors."""
    factors = np.asarray(factors, dtype=np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return {}
    smooth = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    wavelen = 2 * math.pi / inv_freq
    if smooth.sum() >= 2:
        # 1/f = (1 - s)/factor + s with s = L/wavelen * a + b, a = 1/(hf - lf), b = -lf/(hf - lf).
        s = (1 / factors[smooth] - 1 / factor) / (1 - 1 / factor)
        a_l, b = np.polyfit(1 / wavelen[smooth], s, 1)
        high = 1 - 1 / b  # with lf = 1: b = -1/(hf - 1)
        original = a_l * (high - 1)
        params = {
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": float(round(high, 4)),
            "original_max_position_embeddings": round(float(original)),
        }
    else:  # no smooth band to solve from: the Llama 3.1 values, checked below
        params = {
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    lo_wl = params["original_max_position_embeddings"] / params["low_freq_factor"]
    hi_wl = params["original_max_position_embeddings"] / params["high_freq_factor"]
    s = (params["original_max_position_embeddings"] / wavelen - params["low_freq_factor"]) / (
        params["high_freq_factor"] - params["low_freq_factor"]
    )
    expect = np.where(wavelen < hi_wl, 1.0, np.where(wavelen > lo_wl, factor, 1 / ((1 - s) / factor + s)))
    if not np.allclose(expect, factors, rtol=1e-3, atol=1e-4):
        raise ValueError(
            "the GGUF rope_freqs tensor is not llama3-style rope scaling; this file's rope scaling is not supported"
        )
    return {"rope_type": "llama3", **params}


def _rope_scaling(reader, arch: str, head_dim: int, theta: float, tensors: dict) -> dict | None:
    kind = field_value(reader, f"{arch}.rope.scaling.type")
    factor = field_value(reader, f"{arch}.rope.scaling.factor")
    if kind is None and field_value(reader, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", field_value(reader, f"{arch}.rope.scale_linear")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": float(factor if factor is not None else 1.0)}
        original = field_value(reader, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling  # ModelConfig refuses the types fastserve does not implement (yarn, ...)
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None:
        return _llama3_rope_from_factors(_to_numpy(reader, freqs).astype(np.float64), head_dim, theta) or None
    return None


def hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json a Hugging Face checkpoint of this GGUF file would have."""
    reader = open_gguf(path)
    arch = architecture(reader)
    hf_arch, _ = ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}

    def key(name: str, default: Any = KeyError):
        value = field_value(reader, f"{arch}.{name}")
        if value is None:
            if default is KeyError:
                raise ValueError(f"GGUF file {os.fspath(path)!r} has no {arch}.{name} metadata")
            return default
        return value

    if key("expert_count", 0):
        raise ValueError(
            f"GGUF file {os.fspath(path)!r} is a mixture-of-experts model ({arch}.expert_count="
            f"{key('expert_count')}); fastserve supports dense models only"
        )
    if "token_embd.weight" not in tensors:
        raise ValueError(f"GGUF file {os.fspath(path)!r} has no token_embd.weight tensor")
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts (hybrid models): only uniform ones are supported
        if len(set(kv_heads)) != 1:
            raise ValueError(f"GGUF file {os.fspath(path)!r} has per-layer KV head counts {kv_heads}")
        kv_heads = kv_heads[0]
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dim = key("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(
            f"GGUF file {os.fspath(path)!r} rotates {rope_dim} of {head_dim} head channels "
            "(partial rotary), which is not supported"
        )
    theta = float(key("rope.freq_base", 10000.0))
    # The embedding's rows are the vocabulary the model was trained with; ggml lists
    # dimensions innermost first, so token_embd is [hidden, vocab].
    vocab = int(tensors["token_embd.weight"].shape[1])
    tok_ids = {
        name: field_value(reader, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "eot", "eom", "padding")
    }
    from fastserve.gguf_tokenizer import end_of_generation_ids

    weight_types = {t.type_name for t in reader.tensors if len(t.shape) >= 2}
    dtype = {frozenset({"F16"}): "float16", frozenset({"BF16"}): "bfloat16"}.get(frozenset(weight_types), "float32")
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, arch, head_dim, theta, tensors),
        "hidden_act": "silu",
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_output.bias" in tensors if arch == "llama" else "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": tok_ids["bos"],
        "eos_token_id": end_of_generation_ids(reader),
        "pad_token_id": tok_ids["padding"],
        "torch_dtype": dtype,
        # Not part of a config.json: where this config came from, for logs and /v1/models.
        "gguf": {
            "file": os.path.realpath(os.fspath(path)),
            "name": field_value(reader, "general.name"),
            "tensor_types": dict(Counter(t.type_name for t in reader.tensors)),
        },
    }
    if config["rope_scaling"] is None:
        del config["rope_scaling"]
    return config


def _to_numpy(reader: GGUFFile, t: TensorInfo) -> np.ndarray:
    """A GGUF tensor as a float array in HF shape (outermost dimension first); F16 stays
    float16 and BF16 comes back as its int16 bit patterns."""
    kind = t.type_name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(
            f"GGUF tensor {t.name!r} has type {kind}, which fastserve does not load "
            f"(supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the file with one of those"
        )
    raw = reader.tensor_bytes(t)
    if kind == "F32":
        arr = raw.view(np.float32).copy()
    elif kind == "F16":
        arr = raw.view(np.float16).copy()
    elif kind == "BF16":
        arr = raw.view(np.int16).copy()
    else:
        gguf = _require_gguf()
        from gguf.quants import dequantize

        rows = int(np.prod(t.hf_shape[:-1], dtype=np.int64))
        arr = dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType(t.type_id))
    return arr.reshape(t.hf_shape)


def _to_torch(reader: GGUFFile, t: TensorInfo) -> torch.Tensor:
    tensor = torch.from_numpy(_to_numpy(reader, t))
    return tensor.view(torch.bfloat16) if t.type_name == "BF16" else tensor


def _reverse_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of q/k rows (weight [out, in] or bias [out]): its rows of
    each head are (pair index, half) interleaved; HF's are (half, pair index)."""
    rest = w.shape[1:]
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *rest).transpose(1, 2).reshape(w.shape)


def iterate_gguf_weights(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) for every parameter tensor of the GGUF file. Dequantization runs
    a few tensors ahead on a thread pool (numpy releases the GIL in its kernels), bounded so
    that at most that many dequantized tensors exist at once."""
    reader = open_gguf(path)
    arch = architecture(reader)
    permuted = ARCHITECTURES[arch][1]
    heads = int(field_value(reader, f"{arch}.attention.head_count"))
    kv_heads = field_value(reader, f"{arch}.attention.head_count_kv", heads)
    kv_heads = int(kv_heads[0] if isinstance(kv_heads, list) else kv_heads)
    todo = [(t, name) for t in reader.tensors if (name := _hf_layer_name(t.name)) is not None]
    workers = max(1, min(8, os.cpu_count() or 1))
    t0 = time.perf_counter()
    nbytes = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="Loading GGUF tensors", unit="tensor", disable=None, leave=False)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gguf-dequant") as pool:
            pending: deque = deque()
            it = iter(todo)
            for t, name in itertools.islice(it, 2 * workers):
                pending.append((name, t, pool.submit(_to_torch, reader, t)))
            while pending:
                name, t, fut = pending.popleft()
                for nt, nname in itertools.islice(it, 1):
                    pending.append((nname, nt, pool.submit(_to_torch, reader, nt)))
                tensor = fut.result()
                if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
                    tensor = _reverse_permute(tensor, heads)
                elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
                    tensor = _reverse_permute(tensor, kv_heads)
                nbytes += t.n_bytes
                bar.update(1)
                yield name, tensor
    finally:
        bar.close()
    logger.info(
        "read %d GGUF tensors (%.0f MB on disk: %s) in %.1f s",
        len(todo),
        nbytes / 1e6,
        ", ".join(f"{k} x{v}" for k, v in Counter(t.type_name for t, _ in todo).most_common()),
        time.perf_counter() - t0,
    )
