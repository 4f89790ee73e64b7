"""Quantized checkpoints (AWQ, GPTQ, FP8, compressed-tensors) load and run.

Each case quantizes a tiny real HF model's weights with the independent quantize + pack of
tests/quant_formats.py (the formats' formulas, real tensor names and configs), loads it in
fastserve (float32, CPU) and checks greedy output token for token against HF transformers
running the dequantized weights (and, for W8A8, the same per-token fp8 rounding of each
linear's input, through forward pre-hooks): mixed prompt lengths, and for some formats chunked
prefill + a prefix-cache hit + preemption in one run."""

from __future__ import annotations

import logging
import re
import zlib

import pytest
import torch
from fastserve import LLM, SamplingParams
from quant_formats import (
    awq_quantize,
    ct_pack_quantize,
    fake_quant_tokens,
    fp8_quantize,
    gptq_quantize,
    linear_names,
    write_checkpoint,
)
from safetensors.torch import load_file
from test_parity import hf_greedy, mixed_prompts
from tiny_models import SHARED_MODELS, load_hf_model, make_tiny_checkpoint

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
LLAMA3_TOK = SHARED_MODELS / "llama3-tokenizer"
QWEN_TOK = SHARED_MODELS / "qwen3-tokenizer"
# Prompts of one block each are all admitted; their decodes then need a second block that only
# some can get (preemption: test_parity's case). A 16-token budget chunks the prefill of the
# shared-prefix run.
PREEMPT = {"num_gpu_blocks_override": 9, "max_model_len": 128}
CHUNKED = {"max_num_batched_tokens": 16}
PREEMPT_LENGTHS = (14, 15, 13, 12, 15, 11, 14, 9)


def _site(name: str) -> str:
    """Linears that read the same input share an act-order permutation (GPTQ's comes from
    that input's Hessian): q/k/v, and gate/up."""
    return re.sub(r"\.(q_proj|k_proj|v_proj)$", ".attn_in", re.sub(r"\.(gate_proj|up_proj)$", ".mlp_in", name))


def _act_order(k: int, gs: int, gen: torch.Generator) -> torch.Tensor:
    perm = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[perm] = torch.arange(k) // gs  # column perm[i] is quantized i-th: group i // gs
    return g_idx


def _matches(pattern_list, name):
    return any(re.match(p, name) for p in pattern_list)


def build(src, dst, kind: str, opts: dict):
    """(checkpoint dir, dequantized state for HF, {module: fake-quant kwargs} for W8A8)."""
    state = load_file(str(src / "model.safetensors"))
    out = dict(state)
    deq = dict(state)
    hooks = {}
    gen = torch.Generator().manual_seed(1234)
    perms = {}
    skip = opts.get("skip", [])
    qcfg, cfg_file = None, "config.json"
    names = linear_names(state) + (["lm_head"] if opts.get("lm_head") else [])
    for name in names:
        w = state[f"{name}.weight"]
        if _matches(skip, name):
            continue
        del out[f"{name}.weight"]
        if kind == "gptq":
            bits, gs = opts["bits"], opts["group_size"]
            for pattern, override in opts.get("dynamic", {}).items():
                if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), name):
                    bits, gs = override.get("bits", bits), override.get("group_size", gs)
            g_idx = None
            if opts.get("desc_act"):
                g_idx = perms.setdefault((_site(name), gs), _act_order(w.shape[1], gs, gen))
            tensors, w_deq = gptq_quantize(w, bits, gs, opts["sym"], g_idx, v1=opts.get("format", "gptq") == "gptq")
        elif kind == "awq":
            tensors, w_deq = awq_quantize(
                w, opts["group_size"], opts.get("zero_point", True), opts.get("scale_dtype", torch.float16)
            )
        elif kind == "ct_int":
            g_idx = None
            if opts.get("actorder"):
                g_idx = perms.setdefault(_site(name), _act_order(w.shape[1], opts["group_size"], gen))
            tensors, w_deq = ct_pack_quantize(w, opts["bits"], opts["group_size"], opts["symmetric"], g_idx)
        elif kind in ("fp8", "ct_fp8"):
            strategy = opts["strategy"]
            wq, s, w_deq = fp8_quantize(w, strategy, opts.get("block"))
            tensors = {
                "weight": wq,
                ("weight_scale_inv" if strategy == "block" else "weight_scale"): s.reshape(1)
                if kind == "ct_fp8" and strategy == "tensor"
                else s,
            }
            hook = {}
            if opts.get("static"):
                # One calibrated scale per input: the linears reading the same input get the same.
                scale = 2.0 + (zlib.crc32(_site(name).encode()) % 7) / 2
                scale = torch.tensor(scale / 448.0, dtype=torch.float32)
                tensors["input_scale"] = scale.reshape(1) if kind == "ct_fp8" else scale
                hook = {"input_scale": float(scale)}
            elif strategy == "block":
                hook = {"group": opts["block"][1]}
            hooks[name] = hook
        else:
            raise AssertionError(kind)
        out.update({f"{name}.{k}": v for k, v in tensors.items()})
        deq[f"{name}.weight"] = w_deq.float()
    if kind == "gptq":
        qcfg = {
            "quant_method": "gptq",
            "bits": opts["bits"],
            "group_size": opts["group_size"],
            "desc_act": bool(opts.get("desc_act")),
            "sym": opts["sym"],
            "lm_head": opts.get("lm_head") == "config",
            "checkpoint_format": opts.get("format", "gptq"),
            "pack_dtype": "int32",
            "meta": {"quantizer": ["test"]},
        }
        if "dynamic" in opts:
            qcfg["dynamic"] = opts["dynamic"]
        cfg_file = opts.get("config_file", "config.json")
    elif kind == "awq":
        qcfg = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": opts["group_size"],
            "zero_point": opts.get("zero_point", True),
            "version": "gemm",
            "modules_to_not_convert": opts.get("not_convert"),
        }
        if opts.get("config_file") == "quant_config.json":
            qcfg = {"w_bit": 4, "q_group_size": opts["group_size"], "zero_point": True, "version": "GEMM"}
            cfg_file = "quant_config.json"
    elif kind == "ct_int":
        weights = {
            "num_bits": opts["bits"],
            "type": "int",
            "symmetric": opts["symmetric"],
            "strategy": "group" if opts["group_size"] != -1 else "channel",
            "group_size": None if opts["group_size"] == -1 else opts["group_size"],
            "actorder": "group" if opts.get("actorder") else None,
            "dynamic": False,
        }
        qcfg = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "format": "pack-quantized",
                }
            },
            "ignore": ["lm_head"] + opts.get("ignore", []),
        }
    elif kind == "ct_fp8":
        acts = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "dynamic": not opts.get("static"),
            "strategy": "tensor" if opts.get("static") else "token",
        }
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": opts["strategy"], "dynamic": False}
        qcfg = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ["lm_head"],
        }
    elif kind == "fp8":
        qcfg = {"quant_method": "fp8", "activation_scheme": "static" if opts.get("static") else "dynamic"}
        if opts.get("block"):
            qcfg["weight_block_size"] = list(opts["block"])
    write_checkpoint(src, dst, out, qcfg, cfg_file)
    return dst, deq, hooks


def reference(src, deq: dict, hooks: dict):
    hf = load_hf_model(src)
    hf.load_state_dict(deq, strict=True)
    for name, kwargs in hooks.items():
        hf.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, kw=kwargs: (fake_quant_tokens(args[0], **kw).to(args[0].dtype),)
        )
    return hf


_SOURCES = {}


def source(tmp_path_factory, arch: str):
    if arch not in _SOURCES:
        tok = QWEN_TOK if arch.startswith("Qwen") else LLAMA3_TOK
        _SOURCES[arch] = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch), tokenizer_dir=tok, name=arch)
    return _SOURCES[arch]


def run_parity(path, hf, llm_kwargs=None, shared_prefix=0, quantization=None, seed=0, lengths=(1, 7, 17, 33, 50)):
    llm_kwargs = dict(llm_kwargs or {})
    llm = LLM(model=str(path), dtype="float32", device="cpu", quantization=quantization, **llm_kwargs)
    prompts = mixed_prompts(llm.get_tokenizer().vocab_size, seed=seed, shared_prefix=shared_prefix, lengths=lengths)
    if shared_prefix:
        llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, MAX_NEW), f"prompt of {len(prompt)} tokens"
    if "num_gpu_blocks_override" in llm_kwargs:
        assert llm.engine.scheduler.num_preemptions > 0, "the case is meant to force preemption"
    if shared_prefix:
        assert sum(o.num_cached_tokens for o in outs) > 0, "the shared prefix should hit the prefix cache"
    return llm


# (id, arch, kind, opts, stress): every format and variant at least once; stress: also
# preemption, and chunked prefill with a prefix-cache hit.
CASES = [
    ("gptq-4bit-sym-g16", "LlamaForCausalLM", "gptq", dict(bits=4, group_size=16, sym=True), True),
    ("gptq-4bit-asym-g32-qwen2-bias", "Qwen2ForCausalLM", "gptq", dict(bits=4, group_size=32, sym=False), False),
    (
        "gptq-4bit-asym-desc_act",
        "LlamaForCausalLM",
        "gptq",
        dict(bits=4, group_size=16, sym=False, desc_act=True),
        True,
    ),
    (
        "gptq_v2-4bit-asym-desc_act",
        "LlamaForCausalLM",
        "gptq",
        dict(bits=4, group_size=32, sym=False, desc_act=True, format="gptq_v2"),
        False,
    ),
    ("gptq-8bit-sym-channel", "LlamaForCausalLM", "gptq", dict(bits=8, group_size=-1, sym=True), False),
    ("gptq-4bit-lm_head", "LlamaForCausalLM", "gptq", dict(bits=4, group_size=32, sym=False, lm_head="config"), False),
    # lm_head.qweight in the checkpoint while the config says lm_head: false: loaded quantized.
    (
        "gptq-lm_head-undeclared",
        "LlamaForCausalLM",
        "gptq",
        dict(bits=4, group_size=64, sym=True, lm_head="tensors"),
        False,
    ),
    (
        "gptq-quantize_config.json",
        "LlamaForCausalLM",
        "gptq",
        dict(bits=4, group_size=32, sym=True, config_file="quantize_config.json"),
        False,
    ),
    (
        "gptq-dynamic",
        "LlamaForCausalLM",
        "gptq",
        dict(
            bits=4,
            group_size=32,
            sym=False,
            skip=[r".*layers\.1\.mlp\.down_proj"],
            dynamic={
                r"-:.*layers\.1\.mlp\.down_proj": {},
                r"+:.*layers\.0\.self_attn\..*": {"bits": 8, "group_size": 64},
            },
        ),
        False,
    ),
    ("awq-g16", "LlamaForCausalLM", "awq", dict(group_size=16), True),
    ("awq-g64-bf16-scales-qwen2", "Qwen2ForCausalLM", "awq", dict(group_size=64, scale_dtype=torch.bfloat16), False),
    (
        "awq-g-1-not-convert",
        "LlamaForCausalLM",
        "awq",
        dict(group_size=-1, skip=[r".*\.o_proj"], not_convert=["o_proj"]),
        False,
    ),
    ("awq-no-zero-point", "LlamaForCausalLM", "awq", dict(group_size=32, zero_point=False), False),
    ("awq-quant_config.json", "LlamaForCausalLM", "awq", dict(group_size=32, config_file="quant_config.json"), False),
    ("ct-w4a16-g16", "LlamaForCausalLM", "ct_int", dict(bits=4, group_size=16, symmetric=True), True),
    ("ct-w4a16-asym-qwen2", "Qwen2ForCausalLM", "ct_int", dict(bits=4, group_size=32, symmetric=False), False),
    (
        "ct-w4a16-actorder",
        "LlamaForCausalLM",
        "ct_int",
        dict(bits=4, group_size=16, symmetric=True, actorder=True),
        False,
    ),
    (
        "ct-w8a16-channel-ignore",
        "LlamaForCausalLM",
        "ct_int",
        dict(
            bits=8, group_size=-1, symmetric=True, skip=[r".*layers\.0\.mlp\..*"], ignore=["re:.*layers\\.0\\.mlp\\..*"]
        ),
        False,
    ),
    ("fp8-tensor-dynamic", "LlamaForCausalLM", "fp8", dict(strategy="tensor"), True),
    ("fp8-tensor-static-qwen2", "Qwen2ForCausalLM", "fp8", dict(strategy="tensor", static=True), False),
    ("fp8-block16", "LlamaForCausalLM", "fp8", dict(strategy="block", block=(16, 16)), False),
    ("ct-fp8-dynamic-channel", "LlamaForCausalLM", "ct_fp8", dict(strategy="channel"), True),
    ("ct-fp8-static-tensor", "LlamaForCausalLM", "ct_fp8", dict(strategy="tensor", static=True), False),
]


@pytest.mark.parametrize("case_id,arch,kind,opts,stress", CASES, ids=[c[0] for c in CASES])
def test_quantized_greedy_matches_hf_dequantized(tmp_path_factory, case_id, arch, kind, opts, stress):
    src = source(tmp_path_factory, arch)
    path, deq, hooks = build(src, tmp_path_factory.mktemp(case_id), kind, opts)
    hf = reference(src, deq, hooks)
    seed = zlib.crc32(case_id.encode()) % 1000
    llm = run_parity(path, hf, seed=seed)
    assert llm.engine.model_config.quant_config is not None
    model = llm.engine.runner.model
    assert model.model.layers[1].self_attn.qkv_proj.quant_method is not None
    if opts.get("lm_head"):
        assert model.lm_head.qweight.dtype == torch.int32
    for pattern in opts.get("skip", []):  # modules the checkpoint leaves in float run F.linear
        skipped = [m for n, m in model.named_modules() if re.match(pattern, n) and hasattr(m, "quant_method")]
        assert skipped and all(m.quant_method is None for m in skipped)
    if stress:
        run_parity(path, hf, PREEMPT, seed=seed + 1, lengths=PREEMPT_LENGTHS)
        run_parity(path, hf, CHUNKED, shared_prefix=40, seed=seed + 2)


def test_fp8_on_load_of_unquantized_checkpoint(tmp_path_factory, caplog):
    """quantization='fp8' on a float checkpoint: per-channel weight scales, dynamic per-token
    activations (vLLM's behaviour); the log reports the format and the weight bytes."""
    src = source(tmp_path_factory, "LlamaForCausalLM")
    state = load_file(str(src / "model.safetensors"))
    deq, hooks = dict(state), {}
    for name in linear_names(state):
        deq[f"{name}.weight"] = fp8_quantize(state[f"{name}.weight"], "channel")[2]
        hooks[name] = {}
    hf = reference(src, deq, hooks)
    with caplog.at_level(logging.INFO, logger="fastserve"):
        llm = run_parity(src, hf, quantization="FP8", seed=5)
    assert "fp8 quantized at load" in caplog.text and "weights: " in caplog.text
    assert llm.engine.runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("kind,opts", [("awq", dict(group_size=32)), ("ct_fp8", dict(strategy="channel"))])
def test_warm_up_runs_each_quantized_layer_shape_and_leaves_the_model_as_it_was(tmp_path_factory, kind, opts):
    """The engine-start compile pass (run on CUDA by the runner; here its CPU path): one module
    per distinct quantized layer, every dispatch row count up to max_m, and greedy output the
    same before and after (the weights are only read)."""
    from fastserve.quantization.warmup import quantized_layers, warm_up_quantized

    src = source(tmp_path_factory, "Qwen2ForCausalLM")
    path, deq, hooks = build(src, tmp_path_factory.mktemp(f"warm-{kind}"), kind, opts)
    llm = run_parity(path, reference(src, deq, hooks), seed=11)
    model = llm.engine.runner.model
    layers = quantized_layers(model)
    # q/k/v (with Qwen2's bias), o, gate/up and down: four shapes, the 2+ decoder layers share them.
    assert [type(m).__name__ for m in layers] == [
        "QKVParallelLinear",
        "RowParallelLinear",
        "MergedColumnParallelLinear",
        "RowParallelLinear",
    ]
    assert layers[0].bias is not None and layers[1].bias is None
    info = warm_up_quantized(model, 300, torch.float32, torch.device("cpu"))
    assert info["layers"] == 4
    assert info["row_counts"][0] == 1 and info["row_counts"][-1] == 300
    assert {2, 16, 17, 256, 257} <= set(info["row_counts"])
    prompts = mixed_prompts(llm.get_tokenizer().vocab_size, seed=11)
    before = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]
    warm_up_quantized(model, 64, torch.float32, torch.device("cpu"))
    after = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]
    assert before == after
