"""The whole engine on a CUDA GPU (Triton kernels, CUDA graphs, GPU sampling): float32 equals
HF token for token; bf16 follows the CPU float32 path for the first tokens."""

from __future__ import annotations

import pytest
import torch
from fastserve import LLM, SamplingParams

# `checkpoints` is test_parity's module fixture: the same tiny checkpoints and HF references.
from test_parity import GREEDY, MAX_NEW, checkpoints, hf_greedy, mixed_prompts  # noqa: F401

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "variant,kwargs",
    [
        ("llama", {}),
        ("qwen3", {}),
        ("qwen2_tied_mqa", {}),
        ("llama", {"max_num_batched_tokens": 16}),
        ("llama", {"enforce_eager": True, "num_gpu_blocks_override": 10, "max_model_len": 128}),
    ],
)
def test_float32_on_gpu_equals_hf(checkpoints, variant, kwargs):
    path, hf = checkpoints(variant)
    kwargs.setdefault("num_gpu_blocks_override", 512)
    llm = LLM(model=str(path), dtype="float32", device="cuda", **kwargs)
    prompts = mixed_prompts(llm.get_tokenizer().vocab_size, seed=11)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, MAX_NEW)


def test_bf16_on_gpu_follows_cpu_float32(checkpoints):
    path, _ = checkpoints("llama")
    prompts = mixed_prompts(128256, seed=3)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cpu = LLM(model=str(path), dtype="float32", device="cpu").generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    gpu = LLM(model=str(path), dtype="bfloat16", device="cuda", num_gpu_blocks_override=512).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    first = [c.outputs[0].token_ids[0] == g.outputs[0].token_ids[0] for c, g in zip(cpu, gpu)]
    agree = []
    for c, g in zip(cpu, gpu):
        n = 0
        while n < 8 and c.outputs[0].token_ids[n] == g.outputs[0].token_ids[n]:
            n += 1
        agree.append(n)
    print("bf16 vs fp32 agreeing prefix lengths:", agree)
    assert all(first), agree


def test_cuda_graphs_equal_eager(checkpoints):
    path, _ = checkpoints("qwen3")
    prompts = mixed_prompts(151936, seed=5)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    outs = []
    for eager in (False, True):
        llm = LLM(model=str(path), dtype="float32", device="cuda", enforce_eager=eager, num_gpu_blocks_override=512)
        outs.append(
            [
                o.outputs[0].token_ids
                for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            ]
        )
        del llm
        torch.cuda.empty_cache()
    assert outs[0] == outs[1]
