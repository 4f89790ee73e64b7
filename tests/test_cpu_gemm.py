"""The CPU's float32 matmuls through oneDNN (layers/cpu_gemm.py): the packed product against a
float64 reference on random inputs, which weights a model packs, drops or keeps, and the engine
on a packed model against HF transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastserve import LLM, SamplingParams
from fastserve.config import ModelConfig
from fastserve.layers import cpu_gemm
from fastserve.layers.cpu_gemm import pack_cpu_linears
from fastserve.worker.loader import load_model
from tiny_models import SHARED_MODELS, load_hf_model, make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, 3, 20, 32, 100, 256, 257, 600, 1030])
@pytest.mark.parametrize("n,k", [(96, 64), (200, 72), (64, 520)])
def test_packed_linear_matches_float64(rows, n, k):
    g = torch.Generator().manual_seed(rows * 7 + n + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    ref = (x.double() @ w.double().t() + b.double()).float()
    packed = cpu_gemm.pack(w)
    y = cpu_gemm.linear(x, packed, b)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    # float32 accumulation over k terms of size ~1: MKL's own F.linear is off by as much.
    tol = 1e-5 * k
    assert (y - ref).abs().max().item() < tol
    assert (F.linear(x, w, b) - ref).abs().max().item() < tol
    no_bias = cpu_gemm.linear(x, packed, None)
    torch.testing.assert_close(no_bias, y - b, atol=tol, rtol=0)


def test_row_buckets_are_few_and_cover_every_row():
    """oneDNN caches one compiled primitive per row count: every count a step can have maps onto
    a few buckets (so the cache stays small and warm), and the buckets hold all the rows."""
    seen = set()
    for m in range(1, 8193):
        parts = cpu_gemm.bucket_rows(m)
        assert sum(parts) >= m and sum(parts) - m < cpu_gemm.ROW_STEP
        assert all(p == m or p % cpu_gemm.ROW_STEP == 0 or p <= cpu_gemm.SMALL_ROWS for p in parts)
        seen.update(parts)
    assert len(seen) <= 8 + 256 // 16 + 8192 // 256


def test_packed_linear_takes_3d_and_strided_inputs():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
    packed = cpu_gemm.pack(w)
    x3 = torch.randn(2, 5, 40, generator=g)
    torch.testing.assert_close(cpu_gemm.linear(x3, packed, b), F.linear(x3, w, b), atol=1e-4, rtol=1e-5)
    strided = torch.randn(40, 9, generator=g).t()  # [9, 40], not contiguous
    torch.testing.assert_close(cpu_gemm.linear(strided, packed, b), F.linear(strided, w, b), atol=1e-4, rtol=1e-5)


def _model(tmp_path, tie: bool):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / f"tie{tie}", tie_word_embeddings=tie)
    return path, load_model(ModelConfig.from_pretrained(path, device="cpu"))


@pytest.mark.parametrize("tie", [False, True])
def test_pack_cpu_linears_drops_dense_weights_but_keeps_shared_ones(tmp_path, tie):
    _, model = _model(tmp_path, tie)
    ids = torch.randint(0, 1000, (11,), generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[0]
    x = torch.randn(4, layer.self_attn.qkv_proj.input_size)
    head_x = torch.randn(3, model.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(2))
    dense = {"qkv": F.linear(x, layer.self_attn.qkv_proj.weight), "head": F.linear(head_x, model.lm_head.weight)}
    emb_before = model.model.embed_tokens(ids).clone()
    n_linear = sum(1 for m in model.modules() if type(m).__name__.endswith("Linear"))

    assert pack_cpu_linears(model) == n_linear + 1  # every linear and the LM head

    assert layer.self_attn.qkv_proj.weight is None and layer.mlp.down_proj.weight is None
    assert layer.self_attn.qkv_proj.onednn_weight is not None and layer.self_attn.qkv_proj.quant_method is None
    torch.testing.assert_close(layer.self_attn.qkv_proj(x), dense["qkv"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(model.lm_head(head_x), dense["head"], atol=1e-4, rtol=1e-5)
    if tie:
        # The embedding lookup reads rows of the tied weight: it stays, packed beside it.
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert model.lm_head.weight is None
    torch.testing.assert_close(model.model.embed_tokens(ids), emb_before, atol=0, rtol=0)


def test_cpu_gemm_env_keeps_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", "torch")
    _, model = _model(tmp_path, False)
    assert pack_cpu_linears(model) == 0
    assert model.model.layers[0].mlp.down_proj.weight is not None


def test_bfloat16_is_not_packed(tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "bf16")
    model = load_model(ModelConfig.from_pretrained(path, device="cpu", dtype="bfloat16"))
    assert pack_cpu_linears(model) == 0


def test_engine_on_packed_weights_equals_hf_greedy(tmp_path):
    """The engine packs a float32 CPU model at start; greedy tokens stay HF's (batched prompts of
    mixed lengths, so prefill and decode rows of several sizes go through the packed matmuls)."""
    path = make_tiny_checkpoint(
        "Qwen2ForCausalLM", tmp_path / "qwen2", tokenizer_dir=SHARED_MODELS / "qwen3-tokenizer", attention_bias=True
    )
    hf = load_hf_model(path)
    prompts = [[5, 9, 200, 31, 7][: n + 1] + [n + 40] * (3 * n) for n in range(6)]
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_num_batched_tokens=24)
    qkv = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.onednn_weight is not None and qkv.weight is None
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(p) :]
        assert list(o.outputs[0].token_ids) == ref.tolist()
