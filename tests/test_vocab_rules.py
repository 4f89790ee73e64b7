"""logit_bias (OpenAI) and allowed_token_ids (vLLM), end to end: the offline LLM and a real
server, against the model's own greedy choices; bad values are errors naming the field.

Both ride the worker's per-sequence vocabulary rules (RequestParams.vocab_bias /
vocab_allow, worker/sampler_state.py), so each is a field, its validation and its mapping."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from fastserve import LLM, SamplingParams
from server_harness import ServerThread, tiny_qwen_checkpoint

pytestmark = pytest.mark.timeout(300)
PROMPT = [1000, 2000, 3000, 4000]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(model=str(checkpoint), dtype="float32", device="cpu", max_model_len=256)


def greedy(llm, **kw):
    p = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1, **kw)
    return llm.generate([{"prompt_token_ids": PROMPT}], p, use_tqdm=False)[0].outputs[0]


def test_logit_bias_offline(llm):
    plain = greedy(llm)
    # A large bias wins every step; a small one on the runner-up of step 0 flips only that
    # choice when it crosses the gap.
    forced = greedy(llm, logit_bias={777: 100.0})
    assert forced.token_ids == [777] * 6
    # Logprobs stay the model's raw ones (vLLM's raw_logprobs), not the biased ones.
    assert forced.logprobs[0][777].logprob < -1.0
    banned = greedy(llm, logit_bias={plain.token_ids[0]: -100.0})
    assert banned.token_ids[0] != plain.token_ids[0]
    assert greedy(llm, logit_bias={}).token_ids == plain.token_ids
    with pytest.raises(ValueError, match="logit_bias"):
        greedy(llm, logit_bias={10**9: 1.0})
    with pytest.raises(ValueError, match="logit_bias keys"):
        SamplingParams(logit_bias={"x": 1.0})


def test_allowed_token_ids_offline(llm):
    allowed = [5, 77, 901, 12345]
    out = greedy(llm, allowed_token_ids=allowed)
    assert set(out.token_ids) <= set(allowed)
    sampled = llm.generate(
        [{"prompt_token_ids": PROMPT}],
        SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True, n=3, allowed_token_ids=allowed),
        use_tqdm=False,
    )[0]
    assert all(set(c.token_ids) <= set(allowed) for c in sampled.outputs)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        greedy(llm, allowed_token_ids=[10**9])


def test_server_fields(checkpoint):
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
            "--max-model-len",
            "256",
        ]
    ).start()
    url = f"{srv.base_url}/v1/completions"
    body = dict(model="m", prompt=PROMPT, max_tokens=5, temperature=0, ignore_eos=True)

    async def post(session, **extra):
        async with session.post(url, json={**body, **extra}) as r:
            return r.status, await r.json()

    async def run():
        async with aiohttp.ClientSession() as s:
            return [
                await post(s, logit_bias={"777": 500}),  # clamped to 100: still forced
                await post(s, allowed_token_ids=[5, 901]),
                await post(s, logit_bias={"abc": 1}),
                await post(s, logit_bias={str(10**9): 1}),
                await post(s, allowed_token_ids=[]),
                await post(s, echo=False),
            ]

    try:
        (s1, forced), (s2, allowed), (s3, bad_key), (s4, oov), (s5, empty), (s6, plain) = asyncio.run(run())
    finally:
        srv.stop()
    tok_forced = srv.state.engine.tokenizer.decode([777] * 5)
    assert s1 == 200 and forced["choices"][0]["text"] == tok_forced
    assert s2 == 200 and s6 == 200
    for status, data, field in ((s3, bad_key, "logit_bias"), (s4, oov, "logit_bias"), (s5, empty, "allowed_token_ids")):
        assert status == 400 and data["error"]["param"] == field, data
