"""Tensor parallelism on CPU (gloo): two real processes, each holding half of every layer,
must produce the tokens one process produces (float32), and leave no process behind."""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest
from fastserve import LLM, SamplingParams
from fastserve.distributed.batch_transport import pack, unpack
from tiny_models import SHARED_MODELS, TINY_VARIANTS, make_tiny_checkpoint

TOKENIZER = SHARED_MODELS / "llama3-tokenizer"

pytestmark = pytest.mark.timeout(240)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _prompts(seed: int, n: int = 5) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1000, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]


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


@pytest.mark.parametrize("variant", ["llama", "llama_mqa_tied", "opt_350m", "gpt_neox_sequential"])
def test_tp2_matches_tp1_greedy_and_workers_exit(variant, tmp_path):
    """GQA (2 KV heads split 1 + 1) and MQA with a tied LM head (1 KV head replicated on
    both ranks); OPT with replicated project_in/out and learned positions; GPT-NeoX's
    interleaved fused QKV split by heads with partial rotary. Greedy, seeded random and
    prompt logprobs all equal TP=1."""
    arch, overrides = TINY_VARIANTS[variant]
    path = make_tiny_checkpoint(arch, tmp_path, vocab_size=1001, **overrides)  # odd: padded vocab shard
    prompts = _prompts(len(variant))
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=1),
        SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True, n=2),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3),
    ]

    def run(tp):
        llm = _llm(path, tensor_parallel_size=tp)
        try:
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            pids = llm.engine.executor.worker_pids if tp > 1 else []
            if tp > 1:
                assert len(pids) == tp - 1 and all(_alive(p) for p in pids)
                assert llm.engine.runner.tp_size == tp
        finally:
            llm.shutdown()
        return outs, pids

    ref, _ = run(1)
    got, pids = run(2)
    assert _wait_gone(pids) == []
    for r, g in zip(ref, got):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in r.outputs]
        for rc, gc_ in zip(r.outputs, g.outputs):
            if rc.logprobs:
                for a, b in zip(rc.logprobs, gc_.logprobs):
                    assert a.keys() == b.keys()
                    np.testing.assert_allclose(
                        [x.logprob for x in a.values()], [x.logprob for x in b.values()], atol=1e-4
                    )
        if r.prompt_logprobs:
            np.testing.assert_allclose(
                [next(iter(d.values())).logprob for d in r.prompt_logprobs[1:]],
                [next(iter(d.values())).logprob for d in g.prompt_logprobs[1:]],
                atol=1e-4,
            )


def test_workers_exit_when_llm_is_deleted(tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, vocab_size=1000)
    llm = _llm(path, tensor_parallel_size=2)
    pids = llm.engine.executor.worker_pids
    assert all(_alive(p) for p in pids)
    del llm
    gc.collect()
    assert _wait_gone(pids) == []


@pytest.mark.parametrize(
    "tp,overrides,match",
    [
        (3, {}, "num_attention_heads"),
        (4, {"num_key_value_heads": 4, "intermediate_size": 130}, "intermediate_size"),
        (2, {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 48}, "num_key_value_heads"),
    ],
)
def test_invalid_tensor_parallel_size_is_a_clear_error(tp, overrides, match, tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, vocab_size=1000, **overrides)
    with pytest.raises(ValueError, match=f"--tensor-parallel-size.*{match}"):
        _llm(path, tensor_parallel_size=tp)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        _llm(path, tensor_parallel_size=0)


def test_batch_pack_roundtrip_keeps_every_model_input(tmp_path):
    """The worker's rebuilt batch holds exactly the driver's arrays, with their dtypes."""
    from fastserve._core import Scheduler, Tokenizer
    from fastserve.sampling_params import SamplingParams as SP

    tok = Tokenizer(str(TOKENIZER))
    sched = Scheduler(
        num_blocks=64,
        max_model_len=128,
        block_size=8,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        tokenizer=tok,
        eos_token_ids=[0],
        seed=0,
    )
    for i, p in enumerate(_prompts(3, 4)):
        sched.add_request(f"r{i}", p, SP(max_tokens=4, prompt_logprobs=1 if i == 1 else None).to_core(tok))
    batch = sched.schedule()
    got = unpack(*pack(batch))
    for name in (
        "input_ids",
        "positions",
        "slot_mapping",
        "query_start_loc",
        "seq_lens",
        "block_tables",
        "logits_indices",
        "prompt_logprob_indices",
    ):
        want = getattr(batch, name)
        np.testing.assert_array_equal(getattr(got, name), want, err_msg=name)
        assert getattr(got, name).dtype == want.dtype, name
    for name in ("num_seqs", "num_tokens", "num_samples", "num_decodes", "max_query_len", "max_seq_len"):
        assert getattr(got, name) == getattr(batch, name), name
    assert batch.prompt_logprob_indices.shape[0] > 0


@pytest.mark.parametrize("how", ["ctrl_c", "sigkill"])
def test_no_orphans_when_the_driver_is_interrupted_or_killed(how, tmp_path):
    """Ctrl+C (SIGINT to the whole process group) makes the driver exit and stop its
    workers; SIGKILL gives the driver no chance at all, and the workers still go (their
    parent pipe hits EOF)."""
    import signal
    import subprocess
    import sys

    from server_harness import subprocess_env

    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, vocab_size=1000)
    script = (
        "import sys, time\n"
        "from fastserve import LLM, SamplingParams\n"
        f"llm = LLM({str(path)!r}, tokenizer={str(TOKENIZER)!r}, device='cpu', dtype='float32', max_model_len=64,\n"
        "          cpu_kv_cache_space_gb=0.01, tensor_parallel_size=2)\n"
        "llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_tokens=2), use_tqdm=False)\n"
        "print(*llm.engine.executor.worker_pids, flush=True)\n"
        "time.sleep(120)\n"
    )
    # A script file without an `if __name__ == "__main__":` guard: spawn must not re-run it
    # in the worker (which would build the LLM again, recursively).
    script_path = tmp_path / "unguarded.py"
    script_path.write_text(script)
    proc = subprocess.Popen(
        [sys.executable, str(script_path)],
        stdout=subprocess.PIPE,
        env=subprocess_env(),
        start_new_session=True,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        pids = [int(x) for x in line.split()]
        assert len(pids) == 1 and _alive(pids[0]), line
        if how == "ctrl_c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.kill()
        proc.wait(30)
        assert _wait_gone(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_with_tensor_parallel_answers_and_stops_its_workers(tmp_path):
    """`-tp 2` through the CLI flags: the engine is built off the event loop (a thread), the
    completion equals the offline TP=1 text, and stopping the server stops the worker."""
    import asyncio

    import aiohttp
    from server_harness import ServerThread

    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, vocab_size=1000)
    prompt = _prompts(9, 1)[0]
    ref_llm = _llm(path)
    ref = (
        ref_llm.generate(
            prompt_token_ids=[prompt],
            sampling_params=SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .text
    )
    ref_llm.shutdown()
    server = ServerThread(
        [
            "--model",
            str(path),
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
            "-tp",
            "2",
            "--served-model-name",
            "tiny",
        ]
    ).start()
    pids = server.state.engine.engine.executor.worker_pids
    try:

        async def ask():
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
            async with (
                aiohttp.ClientSession() as session,
                session.post(server.base_url + "/v1/completions", json=body) as resp,
            ):
                assert resp.status == 200, await resp.text()
                return (await resp.json())["choices"][0]["text"]

        assert asyncio.run(ask()) == ref
        assert all(_alive(p) for p in pids)
    finally:
        server.stop()
    assert _wait_gone(pids) == []


def test_two_node_layout_on_one_machine(tmp_path, monkeypatch):
    """The multi-node path with both "nodes" on localhost: the driver (FASTSERVE_NNODES=2,
    node 0) starts no local worker; `python -m fastserve.distributed.node --node-rank 1`
    runs rank 1, which gets the engine's settings from the driver; tokens equal TP=1 and
    the node process exits once the driver shuts down."""
    import subprocess
    import sys

    from fastserve.distributed.parallel_state import get_open_port
    from server_harness import subprocess_env

    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, vocab_size=1000)
    prompts = _prompts(4, 3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ref_llm = _llm(path)
    ref = [
        o.outputs[0].token_ids
        for o in ref_llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    ]
    ref_llm.shutdown()

    port = get_open_port()
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastserve.distributed.node",
            "-tp",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--device",
            "cpu",
        ],
        env=subprocess_env(),
    )
    try:
        monkeypatch.setenv("FASTSERVE_NNODES", "2")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        llm = _llm(path, tensor_parallel_size=2)
        try:
            assert llm.engine.executor.worker_pids == [] and llm.engine.runner.tp_size == 2
            got = [
                o.outputs[0].token_ids
                for o in llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            ]
        finally:
            llm.shutdown()
        assert got == ref
        node.wait(30)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
