"""Every admission rule of the Rust core raises `fastserve.errors.InvalidRequest` (a ValueError)
naming the request field at fault, so no caller has to recover it from the message."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fastserve._core import RequestParams, Scheduler
from fastserve.errors import InvalidRequest


def check(excinfo: pytest.ExceptionInfo, field: str, words: str) -> None:
    e = excinfo.value
    assert type(e) is InvalidRequest, type(e)
    assert isinstance(e, ValueError)
    assert e.field == field, (e.field, str(e))
    assert words in str(e), str(e)


# (kwargs of RequestParams, field, words the message must hold)
PARAM_RULES = [
    ({"n": 0}, "n", "n must be at least 1"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "must not exceed max_tokens"),
    ({"temperature": -0.5}, "temperature", "temperature must be a finite number"),
    ({"temperature": math.nan}, "temperature", "temperature must be a finite number"),
    ({"top_p": 0.0}, "top_p", "top_p must be in (0, 1]"),
    ({"min_p": 1.5}, "min_p", "min_p must be in [0, 1]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "repetition_penalty must be > 0"),
    ({"presence_penalty": math.inf}, "presence_penalty", "must be finite"),
    ({"frequency_penalty": -math.inf}, "frequency_penalty", "must be finite"),
    ({"bad_words_token_ids": [[3], []]}, "bad_words", "empty token list"),
    ({"stop": ["ok", ""]}, "stop", "empty string"),
    ({"vocab_bias": [(3, math.nan)]}, "logit_bias", "not NaN"),
]


@pytest.mark.parametrize(
    "kwargs,field,words", PARAM_RULES, ids=[r[1] + "-" + str(i) for i, r in enumerate(PARAM_RULES)]
)
def test_request_params_rules_name_their_field(kwargs, field, words):
    with pytest.raises(InvalidRequest) as ei:
        RequestParams(**kwargs)
    check(ei, field, words)


def scheduler(**kw) -> Scheduler:
    args = {"num_blocks": 8, "block_size": 16, "max_model_len": 256, "max_num_seqs": 4, "max_num_sample_rows": 6}
    return Scheduler(**{**args, **kw})


def test_valid_request_is_admitted():
    # The rules below fail for their one broken input, not for the setup.
    s = scheduler()
    s.add_request("ok", [1, 2, 3], RequestParams(n=2, max_tokens=8))
    assert s.num_waiting == 1


def test_duplicate_request_id():
    s = scheduler()
    s.add_request("a", [1, 2], RequestParams())
    with pytest.raises(InvalidRequest) as ei:
        s.add_request("a", [3, 4], RequestParams())
    check(ei, "request_id", "already in use")


@pytest.mark.parametrize(
    "prompt,words",
    [
        ([], "prompt_token_ids is empty"),
        ([1] * 256, "max_model_len is 256"),
        ([1, -1], "not a token id"),
        (np.array([2**33], dtype=np.int64), "not a token id"),
        (["a", "b"], "must be a sequence of ints"),
    ],
    ids=["empty", "too-long", "negative-id", "id-past-u32", "not-ints"],
)
def test_prompt_rules(prompt, words):
    with pytest.raises(InvalidRequest) as ei:
        scheduler().add_request("r", prompt, RequestParams())
    check(ei, "prompt", words)


def test_more_sequences_than_sample_rows():
    with pytest.raises(InvalidRequest) as ei:
        scheduler().add_request("r", [1, 2], RequestParams(n=7))
    check(ei, "n", "max_num_sample_rows")


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(InvalidRequest) as ei:
        scheduler().add_request("r", [1, 2], RequestParams(stop=["end"]))
    check(ei, "stop", "stop strings need detokenized text")


def test_kv_cache_too_small_names_max_tokens_or_prompt():
    # 8 blocks of 16 tokens hold 128: a short prompt that may grow past it blames max_tokens,
    # a prompt that alone does not fit blames the prompt.
    with pytest.raises(InvalidRequest) as ei:
        scheduler().add_request("r", [1] * 10, RequestParams(max_tokens=200))
    check(ei, "max_tokens", "KV-cache blocks")
    with pytest.raises(InvalidRequest) as ei:
        scheduler().add_request("r", [1] * 140, RequestParams(max_tokens=1))
    check(ei, "prompt", "KV-cache blocks")
