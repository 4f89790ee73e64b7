"""SamplingParams: vLLM's defaults, normalizations and validation messages (each naming the
field), copying/equality, bad_words tokenization and the hand-off to the Rust core."""

import copy
import math
import pickle

import numpy as np
import pytest
from fastserve.sampling_params import SamplingParams
from tiny_models import SHARED_MODELS

QWEN3 = SHARED_MODELS / "qwen3-tokenizer"

VLLM_DEFAULTS = dict(
    n=1,
    best_of=None,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    repetition_penalty=1.0,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    seed=None,
    stop=[],
    stop_token_ids=[],
    bad_words=[],
    ignore_eos=False,
    max_tokens=16,
    min_tokens=0,
    logprobs=None,
    prompt_logprobs=None,
    detokenize=True,
    skip_special_tokens=True,
    spaces_between_special_tokens=True,
    include_stop_str_in_output=False,
    truncate_prompt_tokens=None,
)


def test_defaults_equal_vllm():
    p = SamplingParams()
    for name, value in VLLM_DEFAULTS.items():
        assert getattr(p, name) == value, name
    assert p.sampling_type == "random"


INVALID = [
    (dict(n=0), "n"),
    (dict(n=-3), "n"),
    (dict(n=1.5), "n"),
    (dict(n="2"), "n"),
    (dict(n=True), "n"),
    (dict(best_of=0), "best_of"),
    (dict(n=3, best_of=2), "best_of"),
    (dict(best_of=2.0), "best_of"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(presence_penalty=math.nan), "presence_penalty"),
    (dict(presence_penalty="0.1"), "presence_penalty"),
    (dict(frequency_penalty=3), "frequency_penalty"),
    (dict(frequency_penalty=-math.inf), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=None), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=None), "top_k"),
    (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=math.nan), "min_p"),
    (dict(seed=1.0), "seed"),
    (dict(seed="7"), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(stop=3), "stop"),
    (dict(stop=["ok", 1]), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(stop="x", detokenize=False), "stop"),
    (dict(stop_token_ids=[1, "2"]), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids=[2**32]), "stop_token_ids"),
    (dict(bad_words=[7]), "bad_words"),
    (dict(bad_words=["  "]), "bad_words"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=3.0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=17), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=2.0), "logprobs"),
    (dict(prompt_logprobs=-2), "prompt_logprobs"),
    (dict(detokenize="yes"), "detokenize"),
    (dict(skip_special_tokens=None), "skip_special_tokens"),
    (dict(spaces_between_special_tokens=0), "spaces_between_special_tokens"),
    (dict(include_stop_str_in_output="no"), "include_stop_str_in_output"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(truncate_prompt_tokens=-1), "truncate_prompt_tokens"),
    (dict(temperature=0.0, n=2), "n"),
    (dict(temperature=0.0, best_of=3), "best_of"),
]


@pytest.mark.parametrize("kwargs,field", INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_value_raises_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert field in str(e.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n=4, best_of=4, temperature=0.7),
        dict(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1.3),
        dict(top_p=1e-9, top_k=1, min_p=1.0),
        dict(top_k=-1),
        dict(seed=2**64 - 1),
        dict(seed=-(2**63)),
        dict(max_tokens=None, min_tokens=1000),
        dict(logprobs=0, prompt_logprobs=20),
        dict(truncate_prompt_tokens=1),
        dict(n=np.int64(2), temperature=np.float32(0.5)),
    ],
)
def test_valid_edge_values_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for k, v in kwargs.items():
        assert getattr(p, k) == v


def test_greedy_normalization_like_vllm():
    p = SamplingParams(temperature=1e-6, top_p=0.5, top_k=5, min_p=0.2)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.0, 1.0, 0, 0.0)
    assert p.sampling_type == "greedy"
    # vLLM raises tiny positive temperatures to 0.01 (logits / t overflows below that).
    assert SamplingParams(temperature=0.004).temperature == 0.01
    assert SamplingParams(temperature=0.02).temperature == 0.02
    assert SamplingParams(seed=3).sampling_type == "random_seed"


def test_normalizations():
    p = SamplingParams(stop="###", seed=-1, logprobs=True, stop_token_ids=(7, 9), bad_words="foo")
    assert p.stop == ["###"] and p.seed is None and p.logprobs == 1
    assert p.stop_token_ids == [7, 9] and p.bad_words == ["foo"]
    assert p.all_stop_token_ids == {7, 9}


def test_from_optional_drops_none():
    p = SamplingParams.from_optional(temperature=None, max_tokens=None, top_p=0.5, stop=None)
    assert p.temperature == 1.0 and p.max_tokens == 16 and p.top_p == 0.5 and p.stop == []


def test_clone_equality_repr_pickle():
    p = SamplingParams(n=2, temperature=0.8, stop=["a", "b"], stop_token_ids=[3], seed=5)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("c")
    assert p.stop == ["a", "b"] and q != p
    assert copy.copy(p) == p and copy.deepcopy(p) == p
    assert pickle.loads(pickle.dumps(p)) == p
    assert SamplingParams(top_p=0.9) != SamplingParams(top_p=0.8)
    r = repr(p)
    assert r.startswith("SamplingParams(") and "temperature=0.8" in r and "stop=['a', 'b']" in r
    assert eval(r, {"SamplingParams": SamplingParams}) == p


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    if not (QWEN3 / "tokenizer.json").exists():
        pytest.skip("qwen3 tokenizer not present")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(QWEN3 / "tokenizer.json"))


def test_bad_words_token_ids_like_vllm(hf_tokenizer):
    p = SamplingParams(bad_words=["hello", " world", "antidisestablishmentarianism"])
    got = p.bad_words_token_ids(hf_tokenizer)
    want = []
    for word in p.bad_words:
        plain = hf_tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = hf_tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        want.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            want.append(spaced)
    assert got == want
    # "hello" and " hello" are distinct single tokens in Qwen's vocabulary: both are banned.
    assert [hf_tokenizer.encode("hello", add_special_tokens=False)] == got[:1]
    assert got[1] == hf_tokenizer.encode(" hello", add_special_tokens=False)
    assert all(isinstance(t, int) for ids in got for t in ids)


def test_to_core_fills_request_params():
    core = pytest.importorskip("fastserve._core")
    if not hasattr(core, "RequestParams"):
        pytest.skip("fastserve._core has no RequestParams yet")
    p = SamplingParams(
        n=2,
        best_of=3,
        temperature=0.7,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.1,
        seed=2**64 - 1,
        stop="x",
        stop_token_ids=[5, 6],
        ignore_eos=True,
        max_tokens=None,
        min_tokens=2,
        logprobs=3,
        prompt_logprobs=0,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        include_stop_str_in_output=True,
    )
    rp = p.to_core()
    assert isinstance(rp, core.RequestParams)
    assert rp.n == 3  # best_of sequences run; the engine returns the best n
    assert rp.max_tokens == 2**31 - 1 and rp.min_tokens == 2
    assert (rp.temperature, rp.top_p, rp.top_k, rp.min_p) == pytest.approx((0.7, 0.9, -1, 0.05))
    assert (
        rp.presence_penalty,
        rp.frequency_penalty,
        rp.repetition_penalty,
    ) == pytest.approx((0.5, -0.25, 1.1))
    assert rp.seed == -1  # 2**64 - 1 as an i64, same bits
    assert list(rp.stop) == ["x"] and list(rp.stop_token_ids) == [5, 6]
    assert rp.ignore_eos and rp.include_stop_str_in_output
    assert not rp.skip_special_tokens and not rp.spaces_between_special_tokens and rp.detokenize
    assert rp.logprobs == 3 and rp.prompt_logprobs == 0
    assert list(rp.bad_words_token_ids) == []
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["x"]).to_core()
    if (QWEN3 / "tokenizer.json").exists():
        tok = core.Tokenizer(str(QWEN3))
        words = SamplingParams(bad_words=["hello"])
        want = [tok.encode("hello", False), tok.encode(" hello", False)]
        assert words.bad_words_token_ids(tok) == want
        assert [list(w) for w in words.to_core(tok).bad_words_token_ids] == want
