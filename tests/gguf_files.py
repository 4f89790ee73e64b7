"""Small GGUF files for tests, written with the `gguf` package the way llama.cpp's
convert_hf_to_gguf.py writes them (metadata keys, tensor names, q/k row permutation of the
`llama` architecture, F32 norms), from a tiny random transformers model.

    model, path = write_tiny_gguf(tmp_path / "m.gguf", "llama", "Q4_K")
    fields = byte_level_tokenizer_fields()        # a trained byte-level BPE as GGUF metadata

Quantized types gguf.quants can produce (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16) quantize the
model's weights; the K-quants (which gguf.quants only reads) are random blocks with small
finite scales, and the model's weights are replaced by their dequantized values, so the HF
model returned is exactly the checkpoint the file holds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

# GGUF block type -> (offset, count) of its float16 scale fields, which random bytes would
# make inf/nan: they are overwritten with small values.
_K_QUANT_SCALES = {"Q2_K": (80, 2), "Q3_K": (108, 1), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, 1)}

TINY_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}

_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    _, _, i, *mod, kind = hf_name.split(".")
    return f"blk.{i}.{_LAYER['.'.join(mod)]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rows of each head from HF's half-split
    rotary layout to ggml's interleaved one)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """convert_hf_to_gguf.py's `rope_freqs` tensor for llama3 rope scaling (Llama 3.1+)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            s = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def _random_k_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    off, n = _K_QUANT_SCALES[qtype.name]
    scales = (rng.uniform(0.5, 1.5, size=(raw.shape[0], n)) * 2e-4).astype(np.float16)
    raw[:, off : off + 2 * n] = scales.view(np.uint8).reshape(raw.shape[0], 2 * n)
    return raw.reshape(rows, cols // block * size)


def _encode(arr: np.ndarray, type_name: str, rng: np.random.Generator):
    """(data to write, its GGML type, the float32 values the file will hold)."""
    import gguf
    from gguf.quants import dequantize, quantize

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return arr.astype(np.float32), qtype, arr.astype(np.float32)
    if type_name == "F16":
        data = arr.astype(np.float16)
        return data, qtype, data.astype(np.float32)
    if type_name in _K_QUANT_SCALES:
        data = _random_k_blocks(qtype, arr.shape[0], arr.shape[1], rng)
    else:
        data = quantize(arr.astype(np.float32), qtype)
    return data, qtype, dequantize(data, qtype).reshape(arr.shape).astype(np.float32)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    weight_type: str = "F32",
    *,
    tie: bool = False,
    tokenizer: dict | None = None,
    seed: int = 0,
    metadata: dict | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    **overrides,
):
    """Write a tiny `arch` model ("llama", "qwen2", "qwen3") as a GGUF file whose matrices are
    `weight_type` (1-D tensors F32, as llama.cpp keeps them). Returns (the transformers model
    holding exactly the file's weights, float32, the GGUF path)."""
    import gguf
    import transformers

    tokenizer = tokenizer or byte_level_tokenizer_fields()
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[
        arch
    ]
    shape = {**TINY_SHAPE, **overrides}
    vocab = len(tokenizer["tokenizer.ggml.tokens"])
    config = cls(
        **shape,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=tokenizer.get("tokenizer.ggml.eos_token_id"),
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    a = arch
    writer.add_string("general.name", f"tiny-{arch}-{weight_type}")
    writer.add_uint32(f"{a}.context_length", shape["max_position_embeddings"])
    writer.add_uint32(f"{a}.embedding_length", shape["hidden_size"])
    writer.add_uint32(f"{a}.block_count", shape["num_hidden_layers"])
    writer.add_uint32(f"{a}.feed_forward_length", shape["intermediate_size"])
    writer.add_uint32(f"{a}.attention.head_count", shape["num_attention_heads"])
    writer.add_uint32(f"{a}.attention.head_count_kv", shape["num_key_value_heads"])
    writer.add_uint32(f"{a}.attention.key_length", shape["head_dim"])
    writer.add_uint32(f"{a}.attention.value_length", shape["head_dim"])
    writer.add_uint32(f"{a}.rope.dimension_count", shape["head_dim"])
    writer.add_float32(f"{a}.rope.freq_base", float(shape["rope_theta"]))
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(shape["rms_norm_eps"]))
    writer.add_uint32(f"{a}.vocab_size", vocab)
    for key, value in {**tokenizer, **(metadata or {})}.items():
        _add_field(writer, key, value)
    state = {}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, p in model.state_dict().items():
            if tie and name == "lm_head.weight":
                continue
            arr = p.detach().numpy()
            if arr.ndim == 1:
                data, qtype, held = arr.astype(np.float32), gguf.GGMLQuantizationType.F32, arr
            else:
                heads = None
                if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
                    heads = shape["num_attention_heads"] if ".q_proj." in name else shape["num_key_value_heads"]
                    arr = llama_cpp_permute(arr, heads)
                data, qtype, held = _encode(arr, weight_type, rng)
                if heads is not None:  # the values the HF model holds, in HF row order
                    held = _unpermute(held, heads)
            state[name] = torch.from_numpy(np.ascontiguousarray(held, dtype=np.float32))
            writer.add_tensor(gguf_name(name), data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        for name, arr in (extra_tensors or {}).items():
            writer.add_tensor(name, arr)
        model.load_state_dict(state, strict=False)
        if tie:
            model.tie_weights()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, Path(path)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama_cpp_permute."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_field(writer, key: str, value) -> None:
    from gguf import GGUFValueType as V

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], float):
        writer.add_key_value(key, value, V.ARRAY, sub_type=V.FLOAT32)
    elif isinstance(value, list) and value and isinstance(value[0], int):
        writer.add_key_value(key, value, V.ARRAY, sub_type=V.INT32)
    else:
        writer.add_array(key, value)


# -- tokenizers as GGUF metadata ------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "In 2024 the price was $12.50 for 3 items.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 1 22 333 4444 55555",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "It's what we're doing; they'll see.",
]


def byte_level_tokenizer_fields(vocab_size: int = 320, pre: str = "gpt2") -> dict:
    """A byte-level BPE trained on CORPUS (deterministic) with three control tokens, as the
    `tokenizer.*` metadata llama.cpp writes; also its tokenizer.json under "_hf_json"."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}",
    }


def tokenizer_json_fields(tokenizer_dir: Path, pre: str, add_bos: bool) -> dict:
    """GGUF tokenizer metadata from a Hugging Face byte-level tokenizer.json (what
    convert_hf_to_gguf.py's _set_vocab_gpt2 writes: every id, added tokens typed CONTROL
    when special and USER_DEFINED otherwise)."""
    import json

    j = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["id"]: t for t in j["added_tokens"]}
    vocab = j["model"]["vocab"]
    size = max(list(vocab.values()) + list(added)) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED for holes
    for t, i in vocab.items():
        tokens[i], types[i] = t, 1
    for i, t in added.items():
        tokens[i], types[i] = t["content"], 3 if t["special"] else 4
    merges = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    cfg = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = {t: i for i, t in enumerate(tokens)}
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": add_bos,
    }
    for key, name in (("bos_token", "bos"), ("eos_token", "eos")):
        if cfg.get(key):
            fields[f"tokenizer.ggml.{name}_token_id"] = ids[cfg[key]]
    return fields


def sentencepiece_fields(model_proto: bytes) -> dict:
    """GGUF tokenizer metadata of a SentencePiece model, as convert_hf_to_gguf.py's
    _create_vocab_sentencepiece writes it (scores and llama.cpp token types)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(
            2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1
        )
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def write_tokenizer_gguf(path: Path, fields: dict, arch: str = "llama") -> Path:
    """A GGUF file holding only tokenizer metadata (enough for the tokenizer conversion)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in fields.items():
        _add_field(writer, key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
