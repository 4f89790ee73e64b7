"""A matrix of extreme requests, all inside the documented limits (README "Limits"), on a
real server and through the offline LLM: each is answered correctly (choices, lengths,
token counts), a request in flight beside them is unharmed, and the engine stays alive.

The engine runs with a small max_num_seqs so that the cases cross every per-step limit the
worker's buffers are sized from (worker/step_buffers.py): n = 128 children of 9 prompts are
far more sample rows than 4 x max_num_seqs (the old logits-buffer guess, which crashed the
engine), prompts of max_model_len - 1 tokens with 20 prompt logprobs fill the token budget,
and max_num_seqs prompts finish their prefill in one step. Decode steps go through the
CUDA-graph input path (EngineArgs.emulate_decode_graphs), as on a GPU."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest
from fastserve import LLM, SamplingParams
from fastserve.limits import MAX_N, MAX_PROMPTS, MAX_STOP_STRINGS, MAX_TOKEN_ID_LIST
from server_harness import ServerThread, tiny_qwen_checkpoint

pytestmark = pytest.mark.timeout(900)

MAX_NUM_SEQS = 16
MAX_MODEL_LEN = 256
ENGINE_FLAGS = [
    "--max-num-seqs",
    str(MAX_NUM_SEQS),
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--max-num-batched-tokens",
    "512",
]


class StepStats:
    """Step hook recording what each batch held (a real engine, only observed)."""

    def __init__(self) -> None:
        self.max_samples = 0
        self.max_tokens = 0
        self.full_prefill_steps = 0

    def __call__(self, batch) -> None:
        self.max_samples = max(self.max_samples, batch.num_samples)
        self.max_tokens = max(self.max_tokens, batch.num_tokens)
        if batch.num_decodes == 0 and batch.num_seqs == MAX_NUM_SEQS and batch.num_samples >= MAX_NUM_SEQS:
            self.full_prefill_steps += 1


def _prompts(rng: random.Random, count: int, lo: int = 2, hi: int = 9) -> list[list[int]]:
    return [[rng.randrange(1000, 100000) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]


def cases(tokenizer_words: list[str]) -> dict[str, dict]:
    """name -> (request body, expected number of choices, expected tokens per choice or None)."""
    rng = random.Random(7)
    long_prompt = [rng.randrange(1000, 100000) for _ in range(MAX_MODEL_LEN - 1)]
    return {
        "1024_prompts": (
            dict(prompt=_prompts(rng, MAX_PROMPTS), max_tokens=2, temperature=0, ignore_eos=True),
            MAX_PROMPTS,
            2,
        ),
        "n_128": (
            dict(prompt=_prompts(rng, 9), n=MAX_N, max_tokens=4, temperature=0.8, seed=1, ignore_eos=True),
            9 * MAX_N,
            4,
        ),
        "best_of_128": (
            dict(prompt=_prompts(rng, 9), n=2, best_of=MAX_N, max_tokens=3, temperature=0.8, seed=2, ignore_eos=True),
            9 * 2,
            3,
        ),
        "logprobs_long_prompt": (
            dict(prompt=[long_prompt, long_prompt[::-1]], max_tokens=1, logprobs=20, prompt_logprobs=20, temperature=0),
            2,
            1,
        ),
        "stops_and_bans": (
            dict(
                prompt=_prompts(rng, 3),
                max_tokens=8,
                min_tokens=2,
                temperature=0.9,
                seed=3,
                stop=[f"zz{i}qq" for i in range(MAX_STOP_STRINGS)],
                stop_token_ids=list(range(5000, 5000 + MAX_TOKEN_ID_LIST)),
                bad_words=tokenizer_words[:MAX_TOKEN_ID_LIST],
            ),
            3,
            None,
        ),
        "max_num_seqs_prefills": (
            dict(prompt=_prompts(rng, MAX_NUM_SEQS, 30, 31), max_tokens=3, temperature=0, ignore_eos=True),
            MAX_NUM_SEQS,
            3,
        ),
    }


def _words(tok) -> list[str]:
    """MAX_TOKEN_ID_LIST real vocabulary words to ban."""
    return [tok.decode([i]).strip() or f"w{i}" for i in range(3000, 3000 + MAX_TOKEN_ID_LIST)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _check_completion(name: str, body: dict, status: int, data: dict, choices: int, tokens: int | None) -> None:
    assert status == 200, (name, data)
    got = data["choices"]
    assert len(got) == choices, name
    assert sorted(c["index"] for c in got) == list(range(choices)), name
    if tokens is not None:
        assert data["usage"]["completion_tokens"] == choices * tokens, name
        assert all(c["finish_reason"] == "length" for c in got), name
    if name == "logprobs_long_prompt":
        for c in got:
            lp = c["logprobs"]
            assert len(lp["tokens"]) == 1 and len(lp["top_logprobs"][0]) == 20
            # One entry per prompt token, the first None (nothing precedes it), as vLLM.
            assert len(c["prompt_logprobs"]) == MAX_MODEL_LEN - 1 and c["prompt_logprobs"][0] is None
            assert all(len(e) >= 20 for e in c["prompt_logprobs"][1:])
    if name == "stops_and_bans":
        for c in got:
            assert c["finish_reason"] in ("stop", "length")
            assert 2 <= data["usage"]["completion_tokens"] <= 8 * choices


async def _bystander(session, url: str) -> list[str]:
    """A streamed greedy request running through the whole matrix; returns its text deltas."""
    body = dict(prompt=[11, 12, 13, 14], max_tokens=48, temperature=0, ignore_eos=True, stream=True, model="m")
    parts = []
    async with session.post(url, json=body) as r:
        assert r.status == 200
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    return parts


def test_server_matrix(checkpoint):
    stats = StepStats()
    srv = ServerThread(
        [
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--served-model-name",
            "m",
            *ENGINE_FLAGS,
        ],
        step_hook=stats,
    )
    srv.engine_args.emulate_decode_graphs = True
    srv.start()
    try:
        tok = srv.state.engine.tokenizer
        matrix = cases(_words(tok))
        url = f"{srv.base_url}/v1/completions"

        async def run():
            timeout = aiohttp.ClientTimeout(total=800)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                alone = await _bystander(session, url)
                by = asyncio.ensure_future(_bystander(session, url))

                async def one(name, body):
                    async with session.post(url, json={**body, "model": "m"}) as r:
                        return name, body, r.status, await r.json()

                results = await asyncio.gather(*(one(n, b) for n, (b, _, _) in matrix.items()))
                during = await by
                async with session.get(f"{srv.base_url}/health") as r:
                    health = r.status
                return alone, during, results, health

        alone, during, results, health = asyncio.run(run())
        for name, body, status, data in results:
            _, choices, tokens = matrix[name]
            _check_completion(name, body, status, data, choices, tokens)
        assert during == alone, "the request in flight beside the matrix changed"
        assert health == 200
        assert stats.max_samples > 4 * MAX_NUM_SEQS, stats.max_samples
        assert stats.max_samples <= MAX_NUM_SEQS + MAX_N
    finally:
        srv.stop()


def test_offline_matrix(checkpoint):
    stats = StepStats()
    llm = LLM(
        model=str(checkpoint),
        dtype="float32",
        device="cpu",
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=512,
        emulate_decode_graphs=True,
        step_hook=stats,
    )
    tok = llm.get_tokenizer()
    for name, (body, choices, tokens) in cases(_words(tok)).items():
        params = SamplingParams(**{k: v for k, v in body.items() if k not in ("prompt",)})
        outs = llm.generate([{"prompt_token_ids": p} for p in body["prompt"]], params, use_tqdm=False)
        assert sum(len(o.outputs) for o in outs) == choices, name
        for o in outs:
            for c in o.outputs:
                assert c.finish_reason in ("stop", "length"), (name, c.finish_reason)
                if tokens is not None:
                    assert len(c.token_ids) == tokens, name
            if name == "logprobs_long_prompt":
                assert len(o.prompt_logprobs) == MAX_MODEL_LEN - 1 and o.prompt_logprobs[0] is None
                assert len(o.outputs[0].logprobs[0]) >= 20
    assert stats.max_samples > 4 * MAX_NUM_SEQS
    assert stats.full_prefill_steps > 0, "no step finished max_num_seqs prefills at once"
    # Alive afterwards, and still exact: a greedy request equals the same request run first.
    again = llm.generate(
        [{"prompt_token_ids": [11, 12, 13, 14]}],
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(again[0].outputs[0].token_ids) == 8


def test_step_past_a_buffer_fails_only_its_request(checkpoint, caplog):
    """A bound the scheduler failed to keep (here: a worker buffer made smaller than the
    scheduler's sample-row limit, as a future mismatch would be) is an internal error pinned
    on the request of the first row past it: that request alone fails, the step runs again
    without it, the others' outputs are exact, and the engine keeps serving."""
    import dataclasses

    from fastserve.worker.step_buffers import StepBuffers

    llm = LLM(
        model=str(checkpoint), dtype="float32", device="cpu", max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN
    )
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[21, 22, 23], [31, 32, 33, 34], [41, 42]]
    reference = [
        o.outputs[0].token_ids
        for o in llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], greedy, use_tqdm=False)
    ]
    runner = llm.engine.runner
    runner.buffers = StepBuffers(dataclasses.replace(runner.limits, max_num_sample_rows=5), runner.device)
    wide = SamplingParams(n=8, temperature=0.7, seed=0, max_tokens=6, ignore_eos=True)
    with caplog.at_level("ERROR", logger="fastserve"):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [wide, greedy, greedy], use_tqdm=False)
    assert all(c.finish_reason == "abort" for c in outs[0].outputs)
    assert [o.outputs[0].token_ids for o in outs[1:]] == reference
    assert "internal error" in caplog.text and "sample rows" in caplog.text and "num_samples" in caplog.text
    assert not llm.engine.request_errors, "the offline loop reports and drops each failed request's error"
    again = llm.generate([{"prompt_token_ids": prompts[1]}], greedy, use_tqdm=False)
    assert again[0].outputs[0].token_ids == reference[0]
