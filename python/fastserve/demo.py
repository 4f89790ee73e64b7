"""The built-in demo checkpoint: a tiny Llama-architecture model with random weights and the
real Qwen tokenizer (shipped xz-compressed in fastserve/demo_tokenizer), so `python -m fastserve`
runs with no model at hand. Its output is noise; it exists to try the API and the client.

Built on first use into ~/.cache/fastserve/demo (or $FASTSERVE_CACHE/demo), written to a
temporary directory and renamed so a half-written checkpoint is never used."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL_NAME = "fastserve-demo"
# Bump when the checkpoint below changes so old caches are rebuilt.
_DEMO_VERSION = 1
_SEED = 1234

_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    # Qwen checkpoints pad the embedding past the tokenizer's 151,669 tokens.
    "vocab_size": 151936,
    "bos_token_id": None,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "torch_dtype": "bfloat16",
}


def cache_root() -> Path:
    base = os.environ.get("FASTSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastserve"
    )
    return Path(base)


def _weights(cfg: dict):
    import torch

    g = torch.Generator().manual_seed(_SEED)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    w = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rand(q, h)
        w[p + "self_attn.k_proj.weight"] = rand(kv, h)
        w[p + "self_attn.v_proj.weight"] = rand(kv, h)
        w[p + "self_attn.o_proj.weight"] = rand(h, q)
        w[p + "mlp.gate_proj.weight"] = rand(inter, h)
        w[p + "mlp.up_proj.weight"] = rand(inter, h)
        w[p + "mlp.down_proj.weight"] = rand(h, inter)
        w[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return w


def demo_checkpoint() -> Path:
    """The demo checkpoint directory, built on first call."""
    target = cache_root() / "demo" / f"v{_DEMO_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    import logging

    from safetensors.torch import save_file

    logging.getLogger("fastserve").info("building the demo checkpoint in %s (first use only)", target)
    src = Path(__file__).with_name("demo_tokenizer")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        with lzma.open(src / "tokenizer.json.xz", "rb") as fin, open(tmp / "tokenizer.json", "wb") as fout:
            shutil.copyfileobj(fin, fout)
        for name in ("tokenizer_config.json", "generation_config.json"):
            shutil.copy(src / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(_CONFIG, indent=2))
        save_file(_weights(_CONFIG), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent builder's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
