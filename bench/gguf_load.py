"""GGUF load time at a real model's shape: writes a Q4_K_M-style file (attention, gate/up and
the embedding Q4_K, down and the output head Q6_K, norms F32, random blocks) of the model
in --config, then times each phase of `LLM(model=file.gguf)` and a short generation.

    python bench/gguf_load.py --config bench/configs/llama3-8b --out bench/results/gguf-load-llama3-8b-h200.json
    python bench/gguf_load.py --config bench/configs/llama3-8b --layers 2 --device cpu   # a quick check

Weights are random (outputs are noise): only the times mean something. With
FASTSERVE_SHARED_MODELS set, the file carries the real Llama 3 tokenizer (128k tokens,
280k merges), so the tokenizer conversion is timed at its real size too."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests"), str(ROOT / "bench")]

from device_info import device_info  # noqa: E402
from gguf_files import (  # noqa: E402
    _add_field,
    _random_k_blocks,
    byte_level_tokenizer_fields,
    gguf_name,
    llama3_rope_factors,
    tokenizer_json_fields,
)


def write_file(path: Path, cfg: dict, layers: int) -> dict:
    import gguf

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    shared = os.environ.get("FASTSERVE_SHARED_MODELS")
    tok_dir = Path(shared) / "llama3-tokenizer" if shared else None
    if tok_dir is not None and (tok_dir / "tokenizer.json").is_file():
        tokenizer = tokenizer_json_fields(tok_dir, "llama-bpe", add_bos=True)
    else:
        tokenizer = byte_level_tokenizer_fields()
    h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    w = gguf.GGUFWriter(str(path), "llama")
    a = "llama"
    for key, value in {
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": h,
        "block_count": layers,
        "feed_forward_length": inter,
        "attention.head_count": heads,
        "attention.head_count_kv": kv,
        "rope.dimension_count": hd,
        "vocab_size": vocab,
    }.items():
        w.add_uint32(f"{a}.{key}", value)
    w.add_float32(f"{a}.rope.freq_base", float(cfg.get("rope_theta", 10000.0)))
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-5)))
    for key, value in tokenizer.items():
        _add_field(w, key, value)
    q4k, q6k = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K

    def add(name: str, rows: int, cols: int, qtype) -> None:
        w.add_tensor(gguf_name(name), _random_k_blocks(qtype, rows, cols, rng), raw_dtype=qtype)

    add("model.embed_tokens.weight", vocab, h, q4k)
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "self_attn.q_proj.weight", heads * hd, h, q4k)
        add(p + "self_attn.k_proj.weight", kv * hd, h, q4k)
        add(p + "self_attn.v_proj.weight", kv * hd, h, q6k)
        add(p + "self_attn.o_proj.weight", h, heads * hd, q4k)
        add(p + "mlp.gate_proj.weight", inter, h, q4k)
        add(p + "mlp.up_proj.weight", inter, h, q4k)
        add(p + "mlp.down_proj.weight", h, inter, q6k)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w.add_tensor(gguf_name(p + norm + ".weight"), np.ones(h, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":  # what llama.cpp writes for Llama 3.1+
        w.add_tensor(
            "rope_freqs.weight",
            llama3_rope_factors(
                hd,
                float(cfg["rope_theta"]),
                scaling["factor"],
                scaling["low_freq_factor"],
                scaling["high_freq_factor"],
                scaling["original_max_position_embeddings"],
            ),
        )
    add("lm_head.weight", vocab, h, q6k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {
        "write_s": time.perf_counter() - t0,
        "file_bytes": path.stat().st_size,
        "tokenizer_tokens": len(tokenizer["tokenizer.ggml.tokens"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a directory with the model's config.json")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the config (a quick check)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dir", default=None, help="where to write the GGUF file (default: a temporary directory)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = json.loads((Path(args.config) / "config.json").read_text())
    layers = args.layers or cfg["num_hidden_layers"]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        os.environ["FASTSERVE_CACHE"] = str(Path(tmp) / "cache")
        path = Path(tmp) / "model-Q4_K_M.gguf"
        result: dict = {"config": args.config, "layers": layers, **write_file(path, cfg, layers)}
        import torch
        from fastserve import LLM, SamplingParams
        from fastserve.gguf_file import GGUFFile
        from fastserve.gguf_loader import hf_config, iterate_gguf_weights
        from fastserve.gguf_tokenizer import gguf_tokenizer_dir

        t = time.perf_counter()
        GGUFFile(path)
        result["header_parse_s"] = time.perf_counter() - t
        t = time.perf_counter()
        result["rope_scaling"] = hf_config(path).get("rope_scaling")
        result["config_s"] = time.perf_counter() - t
        t = time.perf_counter()
        gguf_tokenizer_dir(path)
        result["tokenizer_convert_s"] = time.perf_counter() - t
        t = time.perf_counter()
        elems = sum(x.numel() for _, x in iterate_gguf_weights(path))
        dt = time.perf_counter() - t
        result.update(dequant_s=dt, dequant_melem_per_s=elems / dt / 1e6, parameters=elems)
        t = time.perf_counter()
        llm = LLM(model=str(path), device=args.device, max_model_len=2048)
        result["llm_startup_s"] = time.perf_counter() - t
        result["dtype"] = str(llm.engine.model_config.dtype)
        prompts = [{"prompt_token_ids": list(range(100 + i, 228 + i))} for i in range(32)]
        t = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
        dt = time.perf_counter() - t
        result["generate_32x128x64_out_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / dt
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        llm.shutdown()
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["device"] = device_info()
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
