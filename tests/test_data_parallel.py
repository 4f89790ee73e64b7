"""Data parallelism on CPU: engine replicas in processes of their own behind one LLM / one
server; the outputs are the single engine's, in input order, and no process is left."""

from __future__ import annotations

import numpy as np
import pytest
from fastserve import LLM, SamplingParams
from test_tensor_parallel import _alive, _wait_gone
from tiny_models import SHARED_MODELS, make_tiny_checkpoint

TOKENIZER = SHARED_MODELS / "llama3-tokenizer"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("dp"), vocab_size=1000)


def _llm(path, **kw):
    return LLM(
        str(path),
        tokenizer=str(TOKENIZER),
        device="cpu",
        dtype="float32",
        max_model_len=128,
        cpu_kv_cache_space_gb=0.01,
        seed=0,
        **kw,
    )


def test_dp2_matches_dp1_in_input_order(checkpoint):
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 1000, size=int(rng.integers(2, 30))).tolist() for _ in range(7)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=int(rng.integers(3, 12)), ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=1.0, seed=i, max_tokens=6, ignore_eos=True)
        for i in range(len(prompts))
    ]
    ref_llm = _llm(checkpoint)
    ref = ref_llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    ref_llm.shutdown()

    llm = _llm(checkpoint, data_parallel_size=2)
    pids = llm.engine.replica_pids
    try:
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        got = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        assert [o.prompt_token_ids for o in got] == prompts
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
        assert len({o.request_id for o in got}) == len(got)
        # A second call on the same replicas; prompt texts travel with their ids.
        again = llm.generate(
            [{"prompt": "one", "prompt_token_ids": [5, 6]}, {"prompt": "two", "prompt_token_ids": [7]}],
            SamplingParams(temperature=0.0, max_tokens=4),
            use_tqdm=False,
        )
        assert [o.prompt for o in again] == ["one", "two"]
        with pytest.raises(ValueError, match="max_model_len"):
            llm.generate(prompt_token_ids=[[5] * 200], use_tqdm=False)
    finally:
        llm.shutdown()
    assert _wait_gone(pids) == []


def test_server_with_two_replicas_answers_and_spreads_load(checkpoint):
    """`--data-parallel-size 2`: concurrent completions all answer with the single engine's
    greedy text, both replicas served some, stats are summed, and the replicas exit with
    the server."""
    import asyncio

    import aiohttp
    from server_harness import ServerThread

    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 1000, size=int(rng.integers(2, 20))).tolist() for _ in range(6)]
    ref_llm = _llm(checkpoint)
    ref = ref_llm.generate(
        prompt_token_ids=prompts,
        sampling_params=SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    ref_llm.shutdown()

    server = ServerThread(
        [
            "--model",
            str(checkpoint),
            "--tokenizer",
            str(TOKENIZER),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-model-len",
            "128",
            "--num-gpu-blocks-override",
            "64",
            "--data-parallel-size",
            "2",
            "--served-model-name",
            "tiny",
        ]
    ).start()
    engine = server.state.engine
    pids = engine.replica_pids
    try:

        async def ask():
            async with aiohttp.ClientSession() as session:

                async def one(p):
                    body = {"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
                    async with session.post(server.base_url + "/v1/completions", json=body) as resp:
                        assert resp.status == 200, await resp.text()
                        return (await resp.json())["choices"][0]["text"]

                return await asyncio.gather(*(one(p) for p in prompts))

        texts = asyncio.run(ask())
        assert all(texts) and texts == [o.outputs[0].text for o in ref]
        from fastserve.engine.client import EngineClient

        assert isinstance(engine, EngineClient)  # the server holds it as it holds an AsyncEngine

        async def refused():  # checked in the front end: the 400 names the field, as the single engine's does
            body = {"prompt": "x", "max_tokens": 2, "allowed_token_ids": [10**6]}
            async with aiohttp.ClientSession() as session:
                async with session.post(server.base_url + "/v1/completions", json=body) as resp:
                    return resp.status, (await resp.json())["error"]

        status, err = asyncio.run(refused())
        assert status == 400 and err["param"] == "allowed_token_ids", err
        per_replica = engine.replica_stats()
        assert all(s["prefix_cache_queried_tokens"] > 0 for s in per_replica), per_replica
        stats = engine.stats()
        assert stats["num_total_blocks"] == 2 * 64 and stats["data_parallel_size"] == 2
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    finally:
        server.stop()
    assert _wait_gone(pids) == []


def test_invalid_sizes_fail_before_any_replica_starts(checkpoint):
    with pytest.raises(ValueError, match="--tensor-parallel-size.*num_attention_heads"):
        _llm(checkpoint, data_parallel_size=2, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="data_parallel_size"):
        _llm(checkpoint, data_parallel_size=0)


def test_replicas_exit_when_the_parent_is_killed(checkpoint):
    """Replicas are non-daemonic (they may start tensor-parallel workers); their lifeline
    pipe still ends them when the parent dies without any clean-up."""
    import subprocess
    import sys

    from server_harness import subprocess_env

    script = (
        "import time\n"
        "from fastserve import LLM\n"
        f"llm = LLM({str(checkpoint)!r}, tokenizer={str(TOKENIZER)!r}, device='cpu', max_model_len=64,\n"
        "          cpu_kv_cache_space_gb=0.01, data_parallel_size=2)\n"
        "print(*llm.engine.replica_pids, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=subprocess_env(), text=True)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(30)
        assert _wait_gone(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
