"""Structured outputs: request spellings, compilation and its errors, the bitmask (torch and
the Triton kernel under TRITON_INTERPRET=1), the sampler's masking, and the engine's matcher
bookkeeping (n > 1, preemption, prefix hits, stop strings, min_tokens, mixed batches, grammars
still compiling) on a tiny random-weight model with the real Qwen tokenizer: random weights
sample anything the mask allows, so every output matching its grammar is the mask's doing.

The real model's answers (schemas validated with jsonschema) are in
test_structured_outputs_real.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastserve.structured_outputs.bitmask import (
    TokenBitmask,
    allowed_tokens,
    apply_token_bitmask_reference,
)
from fastserve.structured_outputs.params import StructuredOutputsError, StructuredOutputsParams
from fastserve.structured_outputs.request import structured_outputs_from_request
from server_harness import tiny_qwen_checkpoint

xgr = pytest.importorskip("xgrammar")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)

# -- request spellings ---------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.mark.parametrize(
    "fields,kind,value,param",
    [
        ({"response_format": {"type": "json_object"}}, "json_object", True, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": PERSON, "strict": True},
                }
            },
            "json",
            PERSON,
            "response_format",
        ),
        ({"structured_outputs": {"json": PERSON}}, "json", PERSON, "structured_outputs.json"),
        ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "[a-z]+", "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", ["a", "b"], "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": 'root ::= "x"'}}, "grammar", 'root ::= "x"', "structured_outputs.grammar"),
        ({"structured_outputs": {"json_object": True}}, "json_object", True, "structured_outputs.json_object"),
        ({"guided": {"guided_json": PERSON}}, "json", PERSON, "guided_json"),
        ({"guided": {"guided_regex": "a+", "guided_decoding_backend": "xgrammar"}}, "regex", "a+", "guided_regex"),
        ({"guided": {"guided_choice": ["x"]}}, "choice", ["x"], "guided_choice"),
        ({"guided": {"guided_grammar": 'root ::= "y"'}}, "grammar", 'root ::= "y"', "guided_grammar"),
    ],
)
def test_every_spelling_gives_the_constraint(fields, kind, value, param):
    spec = structured_outputs_from_request(**fields)
    assert (spec.kind, getattr(spec, kind), spec.param) == (kind, value, param)


def test_free_text_and_options():
    assert structured_outputs_from_request() is None
    assert structured_outputs_from_request(response_format={"type": "text"}) is None
    spec = structured_outputs_from_request(structured_outputs={"json": PERSON, "disable_any_whitespace": True})
    assert spec.disable_any_whitespace
    spec = structured_outputs_from_request(
        guided={"guided_json": PERSON, "guided_decoding_backend": "xgrammar:disable-any-whitespace"}
    )
    assert spec.disable_any_whitespace
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "hi"}}
    assert json.loads(structured_outputs_from_request(response_format=tag).structural_tag) == tag


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.regex"),
        ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"choice": "a"}}, "structured_outputs.choice"),
        ({"structured_outputs": {"json": PERSON, "whitespace_pattern": " *"}}, "structured_outputs.whitespace_pattern"),
        ({"structured_outputs": {"json": PERSON}, "response_format": {"type": "json_object"}}, "structured_outputs"),
        ({"guided": {"guided_json": PERSON, "guided_regex": "a"}}, "guided_regex"),
        ({"guided": {"guided_json": PERSON, "guided_decoding_backend": "outlines"}}, "guided_decoding_backend"),
        ({"guided": {"guided_json": PERSON, "guided_whitespace_pattern": " "}}, "guided_whitespace_pattern"),
        ({"guided": {"guided_regex": "a"}, "response_format": {"type": "json_object"}}, "guided_regex"),
    ],
)
def test_bad_requests_name_the_field(fields, param):
    with pytest.raises(StructuredOutputsError) as e:
        structured_outputs_from_request(**fields)
    assert e.value.param == param


def test_params_are_vllms():
    from fastserve import StructuredOutputsParams as Top
    from fastserve.sampling_params import SamplingParams
    from fastserve.sampling_params import StructuredOutputsParams as FromSamplingParams

    assert Top is FromSamplingParams is StructuredOutputsParams
    with pytest.raises(ValueError, match="one kind"):
        StructuredOutputsParams(json=PERSON, regex="a")
    with pytest.raises(ValueError, match="needs one constraint"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": PERSON})
    a, b = StructuredOutputsParams(json=PERSON), StructuredOutputsParams(json=json.dumps(PERSON))
    assert a.cache_key() == b.cache_key()
    assert a.cache_key() != StructuredOutputsParams(json=PERSON, disable_any_whitespace=True).cache_key()
    import pickle

    sp = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+", _param="guided_regex"))
    back = pickle.loads(pickle.dumps(sp))
    assert back == sp and back.structured_outputs.param == "guided_regex"
    assert sp.to_core().structured_output and not SamplingParams().to_core().structured_output


# -- compilation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def compiler(checkpoint):
    from fastserve.structured_outputs.compiler import GrammarCompiler

    c = GrammarCompiler(str(checkpoint), 151936, [151645])
    yield c
    c.shutdown()


@pytest.mark.parametrize(
    "spec,param,message",
    [
        (StructuredOutputsParams(json='{"type": "object"'), "structured_outputs.json", "not valid JSON"),
        (StructuredOutputsParams(json={"type": "objekt"}), "structured_outputs.json", "invalid"),
        (StructuredOutputsParams(json={"type": "integer", "multipleOf": 3}), "structured_outputs.json", "multipleOf"),
        (
            StructuredOutputsParams(json={"type": "array", "uniqueItems": True}),
            "structured_outputs.json",
            "uniqueItems",
        ),
        (
            StructuredOutputsParams(json={"type": "string", "format": "credit-card"}),
            "structured_outputs.json",
            "format",
        ),
        (
            StructuredOutputsParams(json={"allOf": [{"type": "string"}, {"enum": ["a"]}]}),
            "structured_outputs.json",
            "allOf",
        ),
        (StructuredOutputsParams(json=[1, 2]), "structured_outputs.json", "JSON object"),
        (StructuredOutputsParams(regex="[0-9"), "structured_outputs.regex", "invalid"),
        (StructuredOutputsParams(regex="a\x00b"), "structured_outputs.regex", "NUL"),
        (StructuredOutputsParams(choice=[]), "structured_outputs.choice", "non-empty"),
        (StructuredOutputsParams(grammar="root ::= foo"), "structured_outputs.grammar", "invalid"),
        (StructuredOutputsParams(grammar="start: foo"), "structured_outputs.grammar", "invalid"),
        (StructuredOutputsParams(structural_tag="{not json"), "structured_outputs.structural_tag", "JSON"),
        (
            StructuredOutputsParams(structural_tag='{"type": "structural_tag", "format": {"type": "nope"}}'),
            "structured_outputs.structural_tag",
            "invalid",
        ),
        (
            StructuredOutputsParams(json=PERSON, whitespace_pattern=" "),
            "structured_outputs.whitespace_pattern",
            "whitespace_pattern",
        ),
        (StructuredOutputsParams(regex="a", _param="guided_regex"), None, None),
    ],
)
def test_compile_errors_name_the_field(compiler, spec, param, message):
    if param is None:
        assert compiler.compile(spec) is not None
        return
    with pytest.raises(StructuredOutputsError, match=message) as e:
        compiler.compile(spec)
    assert e.value.param == param
    assert "/project/cpp" not in str(e.value)


def test_compiles_are_cached_by_constraint(compiler):
    spec = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    before = compiler.stats()
    g1 = compiler.compile(StructuredOutputsParams(json=dict(spec)))
    g2 = compiler.compile(StructuredOutputsParams(json=json.dumps(spec)))
    after = compiler.stats()
    assert g1 is g2
    assert after["num_compiled"] == before["num_compiled"] + 1
    assert after["num_cache_hits"] == before["num_cache_hits"] + 1
    # concurrent submissions of a new constraint share one compile
    futures = [compiler.submit(StructuredOutputsParams(regex="[xyz]{3}")) for _ in range(8)]
    assert len({id(f) for f in futures}) == 1 and futures[0].result() is not None


def test_cache_is_bounded(checkpoint):
    from fastserve.structured_outputs.compiler import GrammarCompiler

    c = GrammarCompiler(str(checkpoint), 151936, [151645], cache_entries=3)
    try:
        for i in range(8):
            c.compile(StructuredOutputsParams(regex=f"a{{{i + 1}}}"))
        assert c.stats()["cache_entries"] <= 3
    finally:
        c.shutdown()


# -- the bitmask ---------------------------------------------------------------------------


def _random_mask(rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    words = (vocab + 31) // 32
    return torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int64, generator=gen).to(torch.int32)


def test_bitmask_reference_is_xgrammars_layout():
    gen = torch.Generator().manual_seed(0)
    vocab = 77
    mask = _random_mask(3, vocab, gen)
    allowed = allowed_tokens(mask, vocab)
    for r in range(3):
        for t in range(vocab):
            bit = (int(mask[r, t // 32]) >> (t % 32)) & 1
            assert allowed[r, t].item() == bool(bit)
    logits = torch.randn(5, vocab, generator=gen)
    rows = torch.tensor([4, 0, 2])
    out = logits.clone()
    apply_token_bitmask_reference(out, mask, rows)
    for i, r in enumerate(rows.tolist()):
        assert torch.equal(torch.isneginf(out[r]), ~allowed[i])
        assert torch.equal(out[r][allowed[i]], logits[r][allowed[i]])
    assert torch.equal(out[[1, 3]], logits[[1, 3]])
    # xgrammar's own CPU kernel agrees
    x = logits.clone()
    xgr.apply_token_bitmask_inplace(
        x, torch.zeros(5, mask.shape[1], dtype=torch.int32).index_copy_(0, rows, mask), indices=rows.tolist()
    )
    assert torch.equal(torch.isneginf(x), torch.isneginf(out))


def check_bitmask_kernel(device: str, rows: int, total: int, vocab: int, dtype) -> None:
    from fastserve.kernels.token_bitmask import apply_token_bitmask as kernel

    gen = torch.Generator().manual_seed(rows * 1000 + vocab)
    mask = _random_mask(rows, vocab, gen).to(device)
    logits = torch.randn(total, vocab, generator=gen).to(dtype).to(device)
    idx = torch.randperm(total, generator=gen)[:rows].to(device)
    ref = logits.clone()
    apply_token_bitmask_reference(ref, mask, idx)
    out = logits.clone()
    kernel(out, mask, idx)
    assert torch.equal(out.cpu(), ref.cpu()), "the kernel's mask differs from the reference"


_KERNEL_CASES = [
    (3, 5, 77, torch.float32),
    (1, 1, 32, torch.float32),
    (4, 9, 5000, torch.float16),
    (2, 2, 4099, torch.bfloat16),
]


def test_bitmask_kernel_interpreted():
    from server_harness import subprocess_env

    env = dict(subprocess_env(), TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__, "kernel"], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=500
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == len(_KERNEL_CASES), proc.stdout


def test_bitmask_kernel_argument_errors():
    from fastserve.kernels.token_bitmask import apply_token_bitmask as kernel

    with pytest.raises(ValueError, match="bitmask"):
        kernel(torch.zeros(2, 64), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="rows"):
        kernel(torch.zeros(2, 64), torch.zeros(1, 2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64))


@pytest.mark.gpu
def test_bitmask_kernel_gpu():
    for rows, total, vocab, dtype in [
        (256, 256, 128256, torch.float32),
        (7, 300, 151936, torch.bfloat16),
        *_KERNEL_CASES,
    ]:
        check_bitmask_kernel("cuda", rows, total, vocab, dtype)


# -- the sampler ---------------------------------------------------------------------------


class _Batch:
    """The sampling fields of a Batch (layers/sampler.py reads only these)."""

    def __init__(self, s, temperature, banned=()):
        self.temperature = np.asarray(temperature, dtype=np.float32)
        self.top_p = np.ones(s, np.float32)
        self.top_k = np.zeros(s, np.int32)
        self.min_p = np.zeros(s, np.float32)
        self.presence_penalty = self.frequency_penalty = np.zeros(s, np.float32)
        self.repetition_penalty = np.ones(s, np.float32)
        self.seeds = np.arange(s, dtype=np.int64) + 11
        self.sample_steps = np.zeros(s, np.int64)
        self.num_logprobs = np.full(s, 3, np.int32)
        self.any_penalties = False
        self.banned_rows = np.array([r for r, _ in banned], np.int64)
        self.banned_token_ids = np.array([t for _, t in banned], np.int64)


def _mask_of(allowed_sets, vocab):
    m = np.zeros((len(allowed_sets), (vocab + 31) // 32), dtype=np.uint32)
    for i, ids in enumerate(allowed_sets):
        for t in ids:
            m[i, t // 32] |= np.uint32(1 << (t % 32))
    return torch.from_numpy(m.view(np.int32))


def test_sampler_masks_constrained_rows_only():
    from fastserve.layers.sampler import Sampler, SamplingTensors

    vocab, s = 200, 4
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(s, vocab, generator=gen) * 4
    allowed = [[5, 63, 150], [31, 32, 199]]
    rows = torch.tensor([1, 3])
    mask = TokenBitmask(_mask_of(allowed, vocab), rows)
    for temps in ([0.0] * s, [1.0] * s, [0.0, 1.0, 0.0, 1.0]):
        st = SamplingTensors.from_batch(_Batch(s, temps), "cpu", vocab)
        free = Sampler()(logits.clone(), st)
        out = Sampler()(logits.clone(), st, mask)
        assert out.sampled_token_ids[1].item() in allowed[0] and out.sampled_token_ids[3].item() in allowed[1]
        # unconstrained rows sample exactly as without a mask
        assert out.sampled_token_ids[[0, 2]].tolist() == free.sampled_token_ids[[0, 2]].tolist()
        # as in vLLM, a constrained row's logprobs are those of the masked distribution
        for i, r in enumerate(rows.tolist()):
            lp = torch.log_softmax(logits[r][allowed[i]], -1)
            chosen = allowed[i].index(out.sampled_token_ids[r].item())
            assert abs(out.sampled_logprobs[r].item() - lp[chosen].item()) < 1e-5
            assert set(out.topk_ids[r].tolist()) == set(allowed[i])


def test_grammar_wins_over_bans():
    """min_tokens bans EOS; a grammar that allows only EOS still gets it (vLLM's outcome)."""
    from fastserve.layers.sampler import Sampler, SamplingTensors

    vocab, eos = 64, 7
    logits = torch.randn(2, vocab)
    st = SamplingTensors.from_batch(_Batch(2, [0.0, 0.0], banned=[(0, eos), (1, eos)]), "cpu", vocab)
    out = Sampler()(logits.clone(), st, TokenBitmask(_mask_of([[eos]], vocab), torch.tensor([0])))
    assert out.sampled_token_ids[0].item() == eos
    assert out.sampled_token_ids[1].item() != eos  # the unconstrained row keeps its ban


# -- the engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(checkpoint):
    from fastserve import LLM

    return LLM(str(checkpoint), device="cpu", max_model_len=256, seed=0)


def _sp(**kw):
    from fastserve import SamplingParams

    return SamplingParams(**kw)


BOUNDED = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "tag": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "tag", "n"],
    "additionalProperties": False,
}


def test_random_weights_follow_every_grammar(llm):
    """Random weights and temperature 1: only the mask makes these outputs match."""
    import jsonschema

    specs = {
        "json": StructuredOutputsParams(json=BOUNDED, disable_any_whitespace=True),
        "regex": StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2}"),
        "choice": StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"]),
        "grammar": StructuredOutputsParams(grammar='root ::= "(" ("x" | "y")+ ")"'),
        "lark": StructuredOutputsParams(grammar='start: "<" WORD ">"\nWORD: /[a-z]{2,4}/'),
    }
    params = [_sp(temperature=1.0, seed=i, max_tokens=120, structured_outputs=s) for i, s in enumerate(specs.values())]
    outs = llm.generate(["Hello"] * len(params), params, use_tqdm=False)
    got = dict(zip(specs, (o.outputs[0] for o in outs)))
    for name, o in got.items():
        assert o.finish_reason == "stop", (name, o.text, o.finish_reason)
    jsonschema.validate(json.loads(got["json"].text), BOUNDED)
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", got["regex"].text)
    assert got["choice"].text in ("alpha", "beta", "gamma delta")
    assert re.fullmatch(r"\([xy]+\)", got["grammar"].text)
    assert re.fullmatch(r"<[a-z]{2,4}>", got["lark"].text)
    stats = llm.engine.structured.stats()
    assert stats["mask_steps"] > 0 and stats["num_constrained_requests"] == 0


def test_n_children_each_follow_the_grammar(llm):
    spec = StructuredOutputsParams(regex=r"(ab|cd){1,3}!")
    (out,) = llm.generate(
        ["Hi"], _sp(n=6, temperature=1.0, seed=3, max_tokens=20, structured_outputs=spec), use_tqdm=False
    )
    texts = [o.text for o in out.outputs]
    assert len(texts) == 6 and all(re.fullmatch(r"(ab|cd){1,3}!", t) for t in texts), texts
    assert len(set(texts)) > 1  # independent matchers, independent samples


def test_mixed_batch_leaves_unconstrained_requests_alone(llm):
    prompts = ["one two three", "four five", "six"]
    free = _sp(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    spec = _sp(temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[a-z]{5}"))
    mixed = llm.generate(prompts + prompts, [free] * 3 + [spec] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    assert all(re.fullmatch("[a-z]{5}", o.outputs[0].text) for o in mixed[3:])


def test_preemption_and_prefix_hits_keep_matchers_right(checkpoint):
    """Few KV blocks force preemption (recompute keeps the tokens, so nothing re-advances);
    the outputs equal a run with room for everyone, and a second run on cached prefixes."""
    from fastserve import LLM

    spec = StructuredOutputsParams(json=BOUNDED, disable_any_whitespace=True)
    params = [_sp(temperature=1.0, seed=i, max_tokens=60, structured_outputs=spec) for i in range(8)]
    prompts = [f"A fairly long prompt number {i} " * 6 for i in range(8)]
    roomy = LLM(str(checkpoint), device="cpu", max_model_len=256, seed=0)
    want = [o.outputs[0].text for o in roomy.generate(prompts, params, use_tqdm=False)]
    again = [o.outputs[0].text for o in roomy.generate(prompts, params, use_tqdm=False)]  # prefix-cache hits
    assert roomy.engine.stats()["prefix_cache_hit_tokens"] > 0
    tight = LLM(str(checkpoint), device="cpu", max_model_len=256, seed=0, num_gpu_blocks_override=20, block_size=16)
    got = [o.outputs[0].text for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.stats()["num_preemptions"] > 0
    assert got == want == again
    for t in got:
        json.loads(t)


def test_stop_string_and_min_tokens_with_a_grammar(llm):
    spec = StructuredOutputsParams(regex=r"[a-z]{6}\.")
    base = llm.generate(["Hi"], _sp(temperature=1.0, seed=5, max_tokens=20, structured_outputs=spec), use_tqdm=False)[
        0
    ].outputs[0]
    stop = base.text[2:4]
    cut = llm.generate(
        ["Hi"], _sp(temperature=1.0, seed=5, max_tokens=20, stop=[stop], structured_outputs=spec), use_tqdm=False
    )[0].outputs[0]
    assert cut.text == base.text[: base.text.index(stop)] and cut.stop_reason == stop
    # min_tokens past the grammar's end: the grammar wins, the output still matches (vLLM's outcome)
    out = llm.generate(
        ["Hi"], _sp(temperature=1.0, seed=5, max_tokens=30, min_tokens=25, structured_outputs=spec), use_tqdm=False
    )[0].outputs[0]
    assert re.fullmatch(r"[a-z]{6}\.", out.text) and out.finish_reason == "stop"


def test_streamed_and_final_only_agree_and_compile_off_the_step_loop(llm):
    """Engine.add_request with a grammar not compiled yet: the request waits outside the
    scheduler while the pool compiles it, others keep running; a bad one fails alone."""
    engine = llm.engine
    # Thousands of alternatives: compiling takes a while, so the requests surely wait for it.
    words = "|".join(f"w{i}x" for i in range(3000))
    spec = StructuredOutputsParams(regex=rf"[0-9]{{2}}:[0-9]{{2}} (am|pm)( ({words}))?")
    ids = engine.tokenizer.encode("The time is", add_special_tokens=False)
    p = _sp(temperature=1.0, seed=9, max_tokens=20, structured_outputs=spec)
    engine.add_request("streamed", ids, p)
    assert "streamed" in engine._awaiting_grammar  # nobody compiled this one before
    engine.add_request("final", ids, p, final_only=True)
    engine.add_request("plain", ids, _sp(temperature=0.0, max_tokens=5, ignore_eos=True))
    bad = _sp(max_tokens=5, structured_outputs=StructuredOutputsParams(regex=f"[0-9]+ ({words}"))
    engine.add_request("bad", ids, bad)
    done = {}
    while engine.has_unfinished():
        for s in engine.step():
            if s.finished:
                done[s.request_id] = s.to_output()
    assert set(done) == {"streamed", "final", "plain", "bad"}
    assert "bad" in engine.request_errors and "constraint" in str(engine.request_errors.pop("bad"))
    a, b = done["streamed"].outputs[0], done["final"].outputs[0]
    assert (a.text, a.token_ids) == (b.text, b.token_ids)
    assert re.fullmatch(r"[0-9]{2}:[0-9]{2} (am|pm)( w[0-9]+x)?", a.text)
    assert len(done["plain"].outputs[0].token_ids) == 5
    assert not engine.structured.requests


def test_offline_bad_constraint_is_a_value_error(llm):
    with pytest.raises(ValueError, match="regex") as e:
        llm.generate(["x"], _sp(max_tokens=3, structured_outputs=StructuredOutputsParams(regex="[")), use_tqdm=False)
    assert e.value.param == "structured_outputs.regex"
    assert not llm.engine.has_unfinished()


@pytest.mark.gpu
def test_gpu_cuda_graphs_follow_grammars_and_match_cpu(llm, checkpoint):
    """On CUDA (decode through captured graphs, the mask applied after the replay, in the
    sampler): greedy constrained answers equal the CPU's token for token (float32), and
    random ones follow their grammars."""
    import jsonschema
    from fastserve import LLM

    gpu = LLM(str(checkpoint), device="cuda", max_model_len=256, seed=0)
    assert gpu.engine.runner.graphs is not None
    specs = [
        StructuredOutputsParams(json=BOUNDED, disable_any_whitespace=True),
        StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2}"),
        StructuredOutputsParams(choice=["alpha", "beta"]),
    ]
    prompts = ["Hello", "One two", "Three"]
    greedy = [_sp(temperature=0.0, max_tokens=60, structured_outputs=s) for s in specs]
    cpu_out = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    gpu_out = [o.outputs[0].token_ids for o in gpu.generate(prompts, greedy, use_tqdm=False)]
    assert gpu_out == cpu_out
    sampled = gpu.generate(
        ["Hi"] * 64,
        [_sp(temperature=1.0, seed=i, max_tokens=60, structured_outputs=specs[i % 3]) for i in range(64)],
        use_tqdm=False,
    )
    for i, o in enumerate(sampled):
        text = o.outputs[0].text
        if i % 3 == 0:
            jsonschema.validate(json.loads(text), BOUNDED)
        elif i % 3 == 1:
            assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", text)
        else:
            assert text in ("alpha", "beta")
    assert gpu.engine.structured.stats()["mask_steps"] > 0


if __name__ == "__main__":
    if sys.argv[1] == "kernel":
        for case in _KERNEL_CASES:
            check_bitmask_kernel("cpu", *case)
            print("ok", case, flush=True)
