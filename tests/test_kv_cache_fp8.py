"""kv_cache_dtype="fp8" (e4m3) and "fp8_e5m2": greedy output and logprobs equal to HF
transformers whose attention reads K/V rounded to the same FP8 format, float32 on the CPU,
with mixed lengths, chunked prefill, prefix hits and preemption in play.

The reference: HF's own eager attention of the model's module, with key and value states
(after rotary, as the cache stores them) passed through `kernels.reference.to_cache_dtype` and
back. Every key a query sees in the engine comes from the cache, the current chunk's included,
so rounding every key and value is the same model. The logprobs are also checked to differ from
the unrounded model's: a cache that silently stayed float32 fails."""

from __future__ import annotations

import math
import sys
import zlib

import pytest
import torch
from fastserve import LLM, SamplingParams
from fastserve.kernels.reference import to_cache_dtype
from test_parity import mixed_prompts, tokenizer_for
from tiny_models import TINY_VARIANTS, load_hf_model, make_tiny_checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _rounding_attention(dtype: torch.dtype):
    def attention(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        key = to_cache_dtype(key, dtype).to(query.dtype)
        value = to_cache_dtype(value, dtype).to(query.dtype)
        return eager(module, query, key, value, attention_mask, **kwargs)

    return attention


for _name, _dtype in (("fastserve_fp8_e4m3", torch.float8_e4m3fn), ("fastserve_fp8_e5m2", torch.float8_e5m2)):
    AttentionInterface.register(_name, _rounding_attention(_dtype))
    # The causal mask eager attention expects (an unknown name would get none).
    AttentionMaskInterface.register(_name, eager_mask)


def hf_greedy_logprobs(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    tokens, logprobs = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            lp = out.logits[0, -1].float().log_softmax(-1)
            nxt = int(lp.argmax())
            tokens.append(nxt)
            logprobs.append(float(lp[nxt]))
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


def assert_matches(hf, prompt: list[int], out) -> list[float]:
    """The engine's greedy tokens equal HF's and its logprobs are within 1e-4; returns them."""
    want, want_lp = hf_greedy_logprobs(hf, prompt, MAX_NEW)
    got = out.outputs[0]
    assert got.token_ids == want, f"prompt of {len(prompt)} tokens"
    got_lp = [got.logprobs[i][t].logprob for i, t in enumerate(got.token_ids)]
    assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 1e-4
    return got_lp


_CACHE: dict = {}


def checkpoint(tmp_path_factory, variant: str):
    if variant not in _CACHE:
        arch, overrides = TINY_VARIANTS[variant]
        path = make_tiny_checkpoint(
            arch, tmp_path_factory.mktemp(variant), tokenizer_dir=tokenizer_for(arch), name=variant, **overrides
        )
        plain = load_hf_model(path)
        rounded = {}
        for kind in ("fp8_e4m3", "fp8_e5m2"):
            m = load_hf_model(path)
            m.set_attn_implementation(f"fastserve_{kind}")
            rounded[kind] = m
        _CACHE[variant] = (path, plain, rounded)
    return _CACHE[variant]


CASES = [
    pytest.param("llama", "fp8", {}, {}, id="llama-e4m3"),
    pytest.param("qwen2", "fp8_e5m2", {}, {}, id="qwen2-e5m2"),
    pytest.param("llama", "fp8_e4m3", {"max_num_batched_tokens": 16}, {"shared_prefix": 40}, id="chunked+prefix"),
    pytest.param(
        "qwen3",
        "fp8",
        {"num_gpu_blocks_override": 9, "max_model_len": 128},
        {"lengths": (14, 15, 13, 12, 15, 11, 14, 9)},
        id="preemption-qwen3",
    ),
]


@pytest.mark.parametrize("variant,kv_cache_dtype,llm_kwargs,prompt_kwargs", CASES)
def test_fp8_kv_cache_matches_hf_with_rounded_kv(tmp_path_factory, variant, kv_cache_dtype, llm_kwargs, prompt_kwargs):
    path, plain, rounded = checkpoint(tmp_path_factory, variant)
    hf = rounded["fp8_e5m2" if kv_cache_dtype == "fp8_e5m2" else "fp8_e4m3"]
    llm = LLM(model=str(path), dtype="float32", device="cpu", kv_cache_dtype=kv_cache_dtype, **llm_kwargs)
    caches = llm.engine.runner.kv_caches
    assert all(c.dtype == FP8[kv_cache_dtype] for c in caches)
    prompts = mixed_prompts(llm.get_tokenizer().vocab_size, seed=zlib.crc32(variant.encode()) % 1000, **prompt_kwargs)
    if "shared_prefix" in prompt_kwargs:
        llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    differs = 0.0
    for prompt, out in zip(prompts, outs):
        got_lp = assert_matches(hf, prompt, out)
        _, plain_lp = hf_greedy_logprobs(plain, prompt, MAX_NEW)
        differs = max(differs, max(abs(a - b) for a, b in zip(got_lp, plain_lp)))
    assert differs > 1e-4, "the FP8 cache's logprobs equal the unrounded model's: was anything rounded?"
    if "shared_prefix" in prompt_kwargs:
        assert sum(o.num_cached_tokens for o in outs) > 0
    if "num_gpu_blocks_override" in llm_kwargs:
        assert llm.engine.scheduler.num_preemptions > 0


def test_fp8_kv_cache_holds_four_times_the_float32_tokens(tmp_path_factory):
    path, _, _ = checkpoint(tmp_path_factory, "llama")
    blocks = {}
    for kind in ("auto", "fp8"):
        llm = LLM(model=str(path), dtype="float32", device="cpu", kv_cache_dtype=kind, cpu_kv_cache_space_gb=0.05)
        blocks[kind] = llm.engine.runner.num_blocks
        del llm
    assert blocks["fp8"] == pytest.approx(4 * blocks["auto"], abs=4)
    assert math.isclose(blocks["fp8"] / blocks["auto"], 4, rel_tol=0.05)


@pytest.mark.parametrize("bad", ["int8", "fp16", "FP8", ""])
def test_unknown_kv_cache_dtype_is_a_clear_error(tmp_path_factory, bad):
    path, _, _ = checkpoint(tmp_path_factory, "llama")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2"):
        LLM(model=str(path), device="cpu", kv_cache_dtype=bad)


def test_cli_flag_reaches_the_engine_args():
    from fastserve.server.app import engine_args_from
    from fastserve.server.cli import parse_args

    args = parse_args(["--model", "m", "--kv-cache-dtype", "fp8_e5m2"])
    assert engine_args_from(args).kv_cache_dtype == "fp8_e5m2"
    assert parse_args(["--model", "m"]).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--kv-cache-dtype", "int8"])


def _scaled_attention(dtype: torch.dtype, scales: dict[int, tuple[float, float]]):
    def attention(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        ks, vs = scales[module.layer_idx]
        key = to_cache_dtype(key / ks, dtype).to(query.dtype) * ks
        value = to_cache_dtype(value / vs, dtype).to(query.dtype) * vs
        return eager(module, query, key, value, attention_mask, **kwargs)

    return attention


def test_checkpoint_kv_scales(tmp_path_factory):
    """k_scale / v_scale tensors in the checkpoint (llm-compressor's names, and the older single
    kv_scale): an FP8 cache stores k / k_scale and equals HF rounding the same way; with
    kv_cache_dtype auto they are ignored (vLLM's behaviour)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    path, plain, _ = checkpoint(tmp_path_factory, "llama")
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    assert layers >= 2
    scaled = tmp_path_factory.mktemp("llama-kv-scales")
    for f in path.iterdir():
        shutil.copy(f, scaled / f.name)
    state = load_file(str(path / "model.safetensors"))
    scales = {i: (0.0015 * (1 + i), 0.002 * (2 + i)) for i in range(layers)}
    for i, (ks, vs) in scales.items():
        if i == 0:  # one scale for both: K's and V's are then the same
            state[f"model.layers.{i}.self_attn.kv_scale"] = torch.tensor(ks)
            scales[i] = (ks, ks)
        else:
            state[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([ks])
            state[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(vs)
    save_file(state, str(scaled / "model.safetensors"))
    name = "fastserve_fp8_scaled_test"
    AttentionInterface.register(name, _scaled_attention(torch.float8_e4m3fn, scales))
    AttentionMaskInterface.register(name, eager_mask)
    hf = load_hf_model(path)
    hf.set_attn_implementation(name)

    llm = LLM(model=str(scaled), dtype="float32", device="cpu", kv_cache_dtype="fp8")
    attn = [layer.self_attn.attn for layer in llm.engine.runner.model.model.layers]
    got = [v for a in attn for v in (a.k_scale, a.v_scale)]
    assert got == pytest.approx([v for i in range(layers) for v in scales[i]])
    prompts = mixed_prompts(llm.get_tokenizer().vocab_size, seed=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert_matches(hf, prompt, out)
    del llm

    llm = LLM(model=str(scaled), dtype="float32", device="cpu")
    assert all(layer.self_attn.attn.k_scale == 1.0 for layer in llm.engine.runner.model.model.layers)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy_logprobs(plain, prompt, MAX_NEW)[0]


def test_bad_kv_scale_is_a_clear_error(tmp_path_factory):
    import shutil

    from safetensors.torch import load_file, save_file

    path, _, _ = checkpoint(tmp_path_factory, "llama")
    bad = tmp_path_factory.mktemp("llama-bad-kv-scale")
    for f in path.iterdir():
        shutil.copy(f, bad / f.name)
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.self_attn.k_scale"] = torch.tensor([0.1, 0.2])
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="k_scale.*one value"):
        LLM(model=str(bad), device="cpu", kv_cache_dtype="fp8")
