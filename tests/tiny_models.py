"""Tiny random-weight Hugging Face checkpoints for tests (no downloads).

    from tiny_models import make_tiny_checkpoint, TINY_VARIANTS
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path)                 # safetensors
    path = make_tiny_checkpoint(*TINY_VARIANTS["qwen3"], tmp_path)           # by variant name
    path = make_tiny_checkpoint("Qwen3ForCausalLM", tmp_path,
                                tokenizer_dir=SHARED_MODELS / "qwen3-tokenizer")
    hf = load_hf_model(path)                                                 # the HF reference

Each checkpoint is a real `transformers` model (hidden 64, 2 layers, 4 query heads of 16,
2 KV heads by default), float32, saved with `save_pretrained`, so config.json, weight names
and tie handling are what real checkpoints have. Weights are HF's init plus random norm
weights and biases (HF initializes those to 1 and 0, which would hide a mis-loaded norm or
bias). Deterministic for a given `seed`.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
from pathlib import Path

import torch

# The real tokenizers are committed under tests/assets/tokenizers (tokenizer.json xz-packed to
# stay under 2 MiB a file; provenance in tests/assets/README.md) and unpacked once into
# tests/.cache (git-ignored; FASTSERVE_TEST_CACHE moves it), so no test reads outside the repo.
_ASSETS = Path(__file__).resolve().parent / "assets" / "tokenizers"
_TOKENIZER_SHA256 = {
    "llama3-tokenizer": "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
    "qwen3-tokenizer": "8b10e68575755dde1297c090bf26be0cd892ca00a20e2bcd621ed1e73d33015d",
}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # concurrent test processes never see a half-written file


def unpack_test_tokenizers(cache: str | os.PathLike | None = None) -> Path:
    """The directory holding llama3-tokenizer/ and qwen3-tokenizer/ (tokenizer.json,
    tokenizer_config.json, generation_config.json), unpacked from tests/assets on first use
    and checked against the recorded sha256; later calls only compare a stamp."""
    root = Path(cache or os.environ.get("FASTSERVE_TEST_CACHE") or Path(__file__).resolve().parent / ".cache")
    root = root / "tokenizers"
    for name, digest in _TOKENIZER_SHA256.items():
        src, dst = _ASSETS / name, root / name
        extras = sorted(src.glob("*.json"))
        key = digest + " " + hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in extras)).hexdigest()
        stamp = dst / ".unpacked"
        if stamp.is_file() and stamp.read_text() == key and (dst / "tokenizer.json").is_file():
            continue
        dst.mkdir(parents=True, exist_ok=True)
        data = lzma.decompress((src / "tokenizer.json.xz").read_bytes())
        if hashlib.sha256(data).hexdigest() != digest:
            raise RuntimeError(
                f"{src / 'tokenizer.json.xz'} does not unpack to the recorded tokenizer "
                f"(sha256 {digest}): restore it from git"
            )
        _write_atomic(dst / "tokenizer.json", data)
        for extra in extras:
            _write_atomic(dst / extra.name, extra.read_bytes())
        _write_atomic(stamp, key.encode())
    return root


# Kept under its old name (it pointed at ../shared/models before the assets were committed).
SHARED_MODELS = unpack_test_tokenizers()

# name -> (architecture, overrides); every entry is exercised by tests/test_models.py.
TINY_VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM", {}),
    "llama_mqa_tied": ("LlamaForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama_mha_bias": ("LlamaForCausalLM", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    "llama3_rope": (
        "LlamaForCausalLM",
        {
            "max_position_embeddings": 256,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama_linear_rope": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # max_position_embeddings below the test lengths so HF's dynamic stretch kicks in.
    "llama_dynamic_rope": (
        "LlamaForCausalLM",
        {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    ),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen2_tied_mqa": ("Qwen2ForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}),  # explicit head_dim != hidden / heads
    "qwen3_tied": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "opt": ("OPTForCausalLM", {}),  # pre-LN, ReLU, tied head (OPT's defaults)
    # opt-350m's shape: post-LN (no final LayerNorm), embeddings narrower than hidden.
    "opt_350m": ("OPTForCausalLM", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
    "opt_nobias_untied": (
        "OPTForCausalLM",
        {"enable_bias": False, "layer_norm_elementwise_affine": False, "tie_word_embeddings": False},
    ),
    "gpt_neox": ("GPTNeoXForCausalLM", {"rotary_pct": 0.5, "rotary_emb_base": 5000}),  # parallel residual
    "gpt_neox_sequential": ("GPTNeoXForCausalLM", {"use_parallel_residual": False, "rotary_pct": 0.25}),
}

# tokenizer size -> embedding rows of the real checkpoints that use it (Qwen pads its
# 151,669 tokens to 151,936 rows; ids past the tokenizer are never produced by it).
_CHECKPOINT_VOCAB = {151669: 151936}

_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


# Architectures whose HF config takes other fields than the Llama family's _BASE.
_ARCH_BASE = {
    "OPTForCausalLM": dict(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512
    ),
    "GPTNeoXForCausalLM": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
}


def _config_class(arch: str):
    import transformers

    table = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "OPTForCausalLM": transformers.OPTConfig,
        "GPTNeoXForCausalLM": transformers.GPTNeoXConfig,
    }
    if arch not in table:
        raise ValueError(f"make_tiny_checkpoint: arch {arch!r} is not one of {sorted(table)}")
    return table[arch]


def tokenizer_vocab_size(tokenizer_dir: str | os.PathLike) -> int:
    """Base vocabulary plus added tokens of a tokenizer.json."""
    with open(Path(tokenizer_dir) / "tokenizer.json", encoding="utf-8") as f:
        tok = json.load(f)
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1


def _special_ids(tokenizer_dir: Path) -> dict:
    gen_path = tokenizer_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    return {k: gen.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def make_tiny_checkpoint(
    arch: str,
    tmp_dir: str | os.PathLike,
    vocab_size: int | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    *,
    save_format: str = "safetensors",
    max_shard_size: str | int | None = None,
    seed: int = 0,
    name: str | None = None,
    **overrides,
) -> Path:
    """Write a tiny random-weight float32 checkpoint of `arch` under `tmp_dir` and return its
    directory.

    vocab_size: default 1000, or with `tokenizer_dir` the embedding rows real checkpoints
        have for that tokenizer (128256 for Llama 3, 151936 for Qwen's padded 151669).
    tokenizer_dir: copy tokenizer.json / tokenizer_config.json / generation_config.json from
        it and set bos/eos/pad ids from its generation_config.json.
    save_format: "safetensors" or "bin" (pytorch_model.bin, the legacy format).
    max_shard_size: e.g. "200KB" to split into several files plus an index json.
    overrides: any config field (num_key_value_heads=1 for MQA, tie_word_embeddings=True,
        rope_scaling={...}, head_dim=..., attention_bias=True, ...). `rope_scaling` given in
        the transformers 4.x form is accepted and converted by transformers.
    """
    from transformers import AutoModelForCausalLM

    if save_format not in ("safetensors", "bin"):
        raise ValueError(f"save_format must be 'safetensors' or 'bin', got {save_format!r}")
    kwargs = dict(_ARCH_BASE.get(arch, _BASE))
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if vocab_size is None:
            size = tokenizer_vocab_size(tokenizer_dir)
            vocab_size = _CHECKPOINT_VOCAB.get(size, size)
        kwargs.update({k: v for k, v in _special_ids(tokenizer_dir).items() if v is not None})
    kwargs["vocab_size"] = vocab_size or 1000
    if arch == "Qwen3ForCausalLM":
        kwargs["head_dim"] = 16  # Qwen3Config's default (128) would dwarf a 64-wide model
    kwargs.update(overrides)
    config = _config_class(arch)(**kwargs)
    config.architectures = [arch]

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.eval()

    out = Path(tmp_dir) / (name or f"{arch}-{save_format}{'-sharded' if max_shard_size else ''}")
    save_kwargs = {"safe_serialization": save_format == "safetensors"}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    try:
        model.save_pretrained(out, **save_kwargs)
    except TypeError:
        # transformers 5 dropped the pickle format from save_pretrained: write it ourselves,
        # with the same names and (when sharded) an index like transformers 4 wrote.
        model.save_pretrained(out, max_shard_size=max_shard_size or "50GB")
        _convert_to_bin(out, sharded=max_shard_size is not None)
    if save_format == "bin" and any(out.glob("*.safetensors")):
        _convert_to_bin(out, sharded=max_shard_size is not None)
    if tokenizer_dir is not None:
        for fname in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / fname).exists():
                shutil.copy(tokenizer_dir / fname, out / fname)
    return out


def _convert_to_bin(out: Path, sharded: bool) -> None:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    weight_map = {}
    for i, f in enumerate(files):
        state = load_file(str(f))
        bin_name = f"pytorch_model-{i + 1:05d}-of-{len(files):05d}.bin" if sharded else "pytorch_model.bin"
        torch.save(state, out / bin_name)
        weight_map.update({k: bin_name for k in state})
        f.unlink()
    index = out / "model.safetensors.index.json"
    if index.exists():
        index.unlink()
    if sharded:
        (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif len(files) > 1:
        raise ValueError("unsharded .bin requested but transformers wrote several safetensors files")


def load_hf_model(path: str | os.PathLike):
    """The transformers reference model for a checkpoint, float32, eval, eager attention
    (the most literal implementation to compare against)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()
