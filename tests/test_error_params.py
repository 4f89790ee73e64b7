"""Every 400 the server answers for a bad field names that field in `param`, as the client
sent it (chat's logprobs count is `top_logprobs`, its length `max_completion_tokens` when that
is what it sent): through a real server, for fields checked by the request structs, by
SamplingParams, by the length rules and by the structured-outputs compiler."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from server_harness import ServerThread, tiny_qwen_checkpoint

pytestmark = pytest.mark.timeout(300)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]

# (route, the bad fields, the param the 400 must name)
CASES = {
    "n": (COMPLETIONS, {"n": 0}, "n"),
    "n-greedy": (COMPLETIONS, {"n": 2, "temperature": 0}, "n"),
    "best_of": (COMPLETIONS, {"n": 3, "best_of": 2}, "best_of"),
    "temperature": (COMPLETIONS, {"temperature": -1}, "temperature"),
    "top_p": (COMPLETIONS, {"top_p": 1.5}, "top_p"),
    "top_k": (COMPLETIONS, {"top_k": -5}, "top_k"),
    "min_p": (COMPLETIONS, {"min_p": 2}, "min_p"),
    "presence_penalty": (COMPLETIONS, {"presence_penalty": 3}, "presence_penalty"),
    "frequency_penalty": (COMPLETIONS, {"frequency_penalty": -3}, "frequency_penalty"),
    "repetition_penalty": (COMPLETIONS, {"repetition_penalty": 0}, "repetition_penalty"),
    "max_tokens": (COMPLETIONS, {"max_tokens": 0}, "max_tokens"),
    "max_tokens-too-many": (COMPLETIONS, {"max_tokens": 100000}, "max_tokens"),
    "min_tokens": (COMPLETIONS, {"max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    "logprobs": (COMPLETIONS, {"logprobs": -1}, "logprobs"),
    "stop": (COMPLETIONS, {"stop": [""]}, "stop"),
    "seed": (COMPLETIONS, {"seed": 2**70}, "seed"),
    "logit_bias-key": (COMPLETIONS, {"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    "logit_bias-vocab": (COMPLETIONS, {"logit_bias": {"999999999": 1}}, "logit_bias"),
    "allowed_token_ids-empty": (COMPLETIONS, {"allowed_token_ids": []}, "allowed_token_ids"),
    "allowed_token_ids-vocab": (COMPLETIONS, {"allowed_token_ids": [999999999]}, "allowed_token_ids"),
    "bad_words": (COMPLETIONS, {"bad_words": ["  "]}, "bad_words"),
    "truncate_prompt_tokens": (COMPLETIONS, {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    "response_format": (
        COMPLETIONS,
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
        "response_format",
    ),
    "max_tokens-type": (COMPLETIONS, {"max_tokens": "many"}, "max_tokens"),
    "chat-n": (CHAT, {"n": 0}, "n"),
    "chat-temperature": (CHAT, {"temperature": -0.5}, "temperature"),
    "chat-top_logprobs": (CHAT, {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    "chat-max_tokens": (CHAT, {"max_tokens": 0}, "max_tokens"),
    "chat-max_completion_tokens": (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens"),
    "chat-max_completion_tokens-too-many": (CHAT, {"max_completion_tokens": 100000}, "max_completion_tokens"),
    "chat-stop": (CHAT, {"stop": ""}, "stop"),
    "chat-seed": (CHAT, {"seed": -(2**70)}, "seed"),
    "chat-logit_bias": (CHAT, {"logit_bias": {"999999999": 1}}, "logit_bias"),
    "chat-allowed_token_ids": (CHAT, {"allowed_token_ids": [-1]}, "allowed_token_ids"),
    "chat-response_format": (CHAT, {"response_format": {"type": "regex"}}, "response_format.type"),
    "chat-reasoning_effort": (CHAT, {"reasoning_effort": "extreme"}, "reasoning_effort"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerThread(
        [
            "--model",
            str(tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt"))),
            "--device",
            "cpu",
            "--max-model-len",
            "256",
        ]
    ).start()
    yield s
    s.stop()


def _answer(server, route: str, fields: dict) -> tuple[int, dict]:
    body = {"messages": MESSAGES} if route == CHAT else {"prompt": "hello"}
    body = {**body, "max_tokens": 4, **fields}

    async def ask():
        async with aiohttp.ClientSession() as s, s.post(server.base_url + route, json=body) as r:
            return r.status, await r.json()

    return asyncio.run(ask())


@pytest.mark.parametrize("case", sorted(CASES))
def test_400_names_the_field(server, case):
    route, fields, param = CASES[case]
    status, body = _answer(server, route, fields)
    assert status == 400, body
    err = body["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"], err


def test_the_server_holds_an_engine_client(server):
    from fastserve.engine.client import EngineClient

    assert isinstance(server.state.engine, EngineClient)


def test_remote_error_keeps_the_field():
    """A data-parallel replica's refusal crosses the pipe with its field (and a RequestError
    with its request id), so the parent answers as the single engine does."""
    import pickle

    from fastserve.distributed.messages import RemoteError
    from fastserve.errors import InvalidRequest, RequestError

    back = pickle.loads(pickle.dumps(RemoteError.of(InvalidRequest("top_p must be in (0, 1]", "top_p")))).rebuild()
    assert type(back) is InvalidRequest and back.field == "top_p" and back.message == "top_p must be in (0, 1]"
    back = RemoteError.of(RequestError("r1", "routing failed")).rebuild()
    assert type(back) is RequestError and back.request_id == "r1" and str(back) == "request 'r1': routing failed"
    back = RemoteError.of(ValueError("plain")).rebuild()
    assert type(back) is ValueError and str(back) == "plain"


def test_good_request_still_answers(server):
    """The cases above differ from a request the server answers only in their bad field."""
    for route in (COMPLETIONS, CHAT):
        status, body = _answer(server, route, {"temperature": 0.5, "seed": 1})
        assert status == 200, body
