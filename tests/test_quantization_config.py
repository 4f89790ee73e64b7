"""Quantization detection and refusal: which format a checkpoint is in (config.json
quantization_config, quantize_config.json, quant_config.json), vLLM's names and aliases any
case, the errors for a contradicting or unsupported quantization, a tensor-parallel size the
quantized layout cannot split (raised before any model memory), dummy quantized weights, and
TP=2 (gloo, CPU) equal to TP=1 for an int4 and an fp8 checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from fastserve import LLM, SamplingParams
from fastserve.engine.arg_utils import EngineArgs
from fastserve.quantization import (
    AWQConfig,
    CompressedTensorsConfig,
    Fp8Config,
    GPTQConfig,
    normalize_quantization,
    resolve_quant_config,
)
from test_quantization_load import build, source
from tiny_models import SHARED_MODELS, make_tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
HF = {"architectures": ["LlamaForCausalLM"]}
AWQ_CFG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


@pytest.mark.parametrize(
    "name,expect",
    [
        ("awq", "awq"),
        ("AWQ", "awq"),
        ("awq_marlin", "awq"),
        ("GPTQ_Marlin", "gptq"),
        ("Fp8", "fp8"),
        ("compressed-tensors", "compressed-tensors"),
        ("Compressed_Tensors", "compressed-tensors"),
        (None, None),
        ("none", None),
    ],
)
def test_names_and_aliases(name, expect):
    assert normalize_quantization(name) == expect


def test_unknown_name_is_refused_listing_the_supported():
    with pytest.raises(ValueError, match="awq.*compressed-tensors.*fp8.*gptq"):
        EngineArgs(model="x", quantization="squeezellm")
    EngineArgs(model="x", quantization="AWQ_MARLIN")  # accepted at argument time
    EngineArgs(model="x.gguf", quantization="GGUF")  # vLLM's name for a .gguf file's own format
    with pytest.raises(ValueError, match="needs a .gguf file"):
        resolve_quant_config("gguf", HF, None)


def test_detection_sources(tmp_path):
    assert isinstance(resolve_quant_config(None, {**HF, "quantization_config": AWQ_CFG}, None), AWQConfig)
    assert resolve_quant_config(None, HF, None) is None
    # AutoGPTQ's quantize_config.json has no quant_method; old AutoAWQ's quant_config.json spells w_bit.
    (tmp_path / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": 32, "desc_act": True, "sym": False})
    )
    cfg = resolve_quant_config("gptq_marlin", HF, str(tmp_path))
    assert isinstance(cfg, GPTQConfig) and (cfg.group_size, cfg.desc_act, cfg.sym) == (32, True, False)
    (tmp_path / "quantize_config.json").unlink()
    (tmp_path / "quant_config.json").write_text(
        json.dumps({"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"})
    )
    cfg = resolve_quant_config(None, HF, str(tmp_path))
    assert isinstance(cfg, AWQConfig) and cfg.group_size == 64
    ct = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "ignore": ["lm_head"],
        "config_groups": {
            "g": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
            }
        },
    }
    assert isinstance(
        resolve_quant_config("COMPRESSED-TENSORS", {**HF, "quantization_config": ct}, None), CompressedTensorsConfig
    )
    fp8 = resolve_quant_config(
        None, {**HF, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, None
    )
    assert isinstance(fp8, Fp8Config) and fp8.block == (128, 128)
    assert not resolve_quant_config("fp8", HF, None).serialized  # fp8 at load


def test_contradictions_and_unsupported_are_clear():
    with pytest.raises(ValueError, match="contradicts the checkpoint.*quant_method 'awq'"):
        resolve_quant_config("gptq", {**HF, "quantization_config": AWQ_CFG}, None)
    with pytest.raises(ValueError, match="no quantization_config.*only 'fp8'"):
        resolve_quant_config("awq", HF, None)
    with pytest.raises(ValueError, match="'bitsandbytes'.*does not load"):
        resolve_quant_config(None, {**HF, "quantization_config": {"quant_method": "bitsandbytes"}}, None)
    with pytest.raises(ValueError, match="version 'gemv'"):
        resolve_quant_config(None, {**HF, "quantization_config": {**AWQ_CFG, "version": "gemv"}}, None)
    with pytest.raises(ValueError, match="checkpoint_format 'marlin'"):
        resolve_quant_config(
            None,
            {**HF, "quantization_config": {"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}},
            None,
        )
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        resolve_quant_config(None, {"architectures": ["GPTNeoXForCausalLM"], "quantization_config": AWQ_CFG}, None)


def test_contradiction_through_llm(tmp_path_factory):
    src = source(tmp_path_factory, "LlamaForCausalLM")
    path, _, _ = build(src, tmp_path_factory.mktemp("awq-contra"), "awq", dict(group_size=32))
    with pytest.raises(ValueError, match="quantization='GPTQ' contradicts"):
        LLM(model=str(path), device="cpu", dtype="float32", quantization="GPTQ")


def test_tp_size_that_breaks_groups_fails_before_loading(tmp_path_factory):
    """o_proj's K = 64 split over 4 ranks is 16 per rank: not whole groups of 32. The error names
    the layer, the dimension and the group size, and comes before any worker starts."""
    src = source(tmp_path_factory, "LlamaForCausalLM")
    path, _, _ = build(src, tmp_path_factory.mktemp("gptq-tp"), "gptq", dict(bits=4, group_size=32, sym=True))
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.self_attn\.o_proj: tensor_parallel_size=4: the input "
        r"dimension K=64 / 4 = 16 per rank is not a multiple of the group size 32",
    ):
        LLM(model=str(path), device="cpu", dtype="float32", tensor_parallel_size=4)
    desc, _, _ = build(
        src, tmp_path_factory.mktemp("gptq-tp-desc"), "gptq", dict(bits=4, group_size=16, sym=True, desc_act=True)
    )
    with pytest.raises(ValueError, match=r"o_proj: tensor_parallel_size=2: act-order"):
        LLM(model=str(desc), device="cpu", dtype="float32", tensor_parallel_size=2)


@pytest.mark.parametrize("quantization", ["awq", "gptq", "fp8", "compressed-tensors"])
def test_dummy_weights_in_the_quantized_layout(tmp_path, quantization, caplog):
    """load_format='dummy' + a quantization: random tensors in the format's real layout (its
    default group 128), converted like a checkpoint's; the engine generates."""
    import logging

    path = make_tiny_checkpoint(
        "LlamaForCausalLM",
        tmp_path,
        tokenizer_dir=SHARED_MODELS / "llama3-tokenizer",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    for f in path.glob("*.safetensors"):
        f.unlink()  # dummy needs no weights, as for a benchmark of a config alone
    with caplog.at_level(logging.INFO, logger="fastserve"):
        llm = LLM(model=str(path), device="cpu", dtype="float32", load_format="dummy", quantization=quantization)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert len(out) == 8
    layer = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    if quantization == "fp8":
        assert layer.weight.dtype == torch.float8_e4m3fn
    else:
        assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (128 // 8, 128 + 2 * 64)
    assert "weights: " in caplog.text and quantization.split("-")[0] in caplog.text


def _tp_llm(path, tp):
    return LLM(
        str(path), device="cpu", dtype="float32", max_model_len=128, cpu_kv_cache_space_gb=0.01, tensor_parallel_size=tp
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "kind,opts",
    [("awq", dict(group_size=16)), ("fp8", dict(strategy="tensor", static=True))],
    ids=["awq-int4", "fp8-per-tensor-static"],
)
def test_tp2_equals_tp1(tmp_path_factory, kind, opts):
    """Static activation scales: a row-parallel rank quantizes its half of the input exactly as
    one rank would. (Dynamic per-token scales are per rank under TP, as in vLLM: another
    rounding, so not token-equal on a random model's near ties.)"""
    src = source(tmp_path_factory, "LlamaForCausalLM")
    path, _, _ = build(src, tmp_path_factory.mktemp(f"tp-{kind}"), kind, opts)
    prompts = [{"prompt_token_ids": list(range(3 + i, 20 + 3 * i))} for i in range(4)]
    results = []
    for tp in (1, 2):
        llm = _tp_llm(path, tp)
        try:
            results.append([o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)])
        finally:
            llm.shutdown()
    assert results[0] == results[1]


def test_cli_flag_reaches_engine_args():
    from fastserve.server.app import engine_args_from
    from fastserve.server.cli import make_parser

    args = make_parser().parse_args(["--model", "m", "--quantization", "GPTQ_Marlin"])
    assert engine_args_from(args).quantization == "GPTQ_Marlin"
    assert engine_args_from(make_parser().parse_args(["--model", "m"])).quantization is None
