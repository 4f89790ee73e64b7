"""The tensor-parallel executor on one GPU (world size 1): NCCL group start-up with the device
bound, the gloo control group, every Batch sent through the transport, CUDA graphs captured in
a process that has a process group, and clean shutdown. Two-GPU runs need a machine with two
GPUs; this is the part of that path one GPU can run."""

from __future__ import annotations

import pytest
import torch
from fastserve import LLM, SamplingParams
from fastserve.distributed import executor as tp_executor
from fastserve.engine import engine as engine_module
from tiny_models import SHARED_MODELS, make_tiny_checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tp_executor_world_size_one_matches_uniproc(device, tmp_path, monkeypatch):
    """On CPU the same path with gloo (what CI runs); on a GPU with NCCL."""
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40, 9)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kw = dict(
        tokenizer=str(SHARED_MODELS / "llama3-tokenizer"), dtype="float32", max_model_len=256, seed=0, device=device
    )
    if device == "cuda":
        kw["gpu_memory_utilization"] = 0.3
    else:
        kw["cpu_kv_cache_space_gb"] = 0.01
    llm = LLM(str(path), **kw)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    del llm
    if device == "cuda":
        torch.cuda.empty_cache()

    made = []

    def tp_always(args, model_config):  # make_executor picks the in-process executor at size 1
        ex = tp_executor.TensorParallelExecutor(args, model_config)
        made.append(ex)
        return ex

    monkeypatch.setattr(engine_module, "make_executor", tp_always)
    llm = LLM(str(path), **kw)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert (
        made
        and torch.distributed.is_initialized()
        and torch.distributed.get_backend() == {"cpu": "gloo", "cuda": "nccl"}[device]
    )
    assert got == want
    made[0].shutdown()
    assert not torch.distributed.is_initialized()
