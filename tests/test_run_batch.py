"""`fastserve run-batch`: an OpenAI Batch file on the offline engine. Good lines answer what
the server answers for the same body (checked against a real server), bad lines become that
line's error and the job goes on, an interrupted output resumes, and tensor/data parallel
runs give the single engine's outputs."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from fastserve.__main__ import main as fastserve_main
from tiny_models import SHARED_MODELS, make_tiny_checkpoint

TOKENIZER = SHARED_MODELS / "llama3-tokenizer"
ENGINE = [
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--max-model-len",
    "128",
    "--num-gpu-blocks-override",
    "64",
    "--served-model-name",
    "tiny",
]

pytestmark = pytest.mark.timeout(300)

GOOD = {
    "chat": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5, "temperature": 0},
    ),
    "two-prompts": (
        "/v1/completions",
        {
            "prompt": ["one two", "three four five"],
            "max_tokens": 4,
            "temperature": 0.8,
            "seed": 11,
            "n": 2,
            "model": "tiny",
        },
    ),
    "ids-logprobs": (
        "/v1/completions",
        {"prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True},
    ),
    "chat-logprobs": (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ),
}
# custom_id -> (line, expected status, expected param)
BAD = {
    "wrong-url": (
        '{"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}',
        400,
        "url",
    ),
    "bad-field": (
        '{"custom_id": "bad-field", "method": "POST", "url": "/v1/completions", '
        '"body": {"prompt": "x", "max_tokens": "many"}}',
        400,
        "max_tokens",
    ),
    "bad-model": (
        '{"custom_id": "bad-model", "method": "POST", "url": "/v1/completions", '
        '"body": {"prompt": "x", "model": "other"}}',
        404,
        "model",
    ),
    "too-long": (
        '{"custom_id": "too-long", "method": "POST", "url": "/v1/completions", '
        '"body": {"prompt": [5, 6, 7], "max_tokens": 500}}',
        400,
        "max_tokens",
    ),
    "streamed": (
        '{"custom_id": "streamed", "method": "POST", "url": "/v1/chat/completions", '
        '"body": {"messages": [{"role": "user", "content": "x"}], "stream": true}}',
        400,
        "stream",
    ),
    "bad-role": (
        '{"custom_id": "bad-role", "method": "POST", "url": "/v1/chat/completions", '
        '"body": {"messages": [{"role": "wizard", "content": "x"}]}}',
        400,
        "messages[0].role",
    ),
    "no-body": ('{"custom_id": "no-body", "method": "POST", "url": "/v1/completions"}', 400, "body"),
}
NOT_REQUESTS = ["this line is not JSON", '{"method": "POST", "url": "/v1/completions", "body": {}}']


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return make_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("rb"), tokenizer_dir=TOKENIZER)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("rb-small"), vocab_size=1000)


def write_input(path, good=GOOD, bad=BAD, extra_lines=NOT_REQUESTS):
    lines = []
    for cid, (url, body) in good.items():
        lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}))
    lines.append("")  # blank lines are skipped, not errors
    lines += [b[0] for b in bad.values()] + list(extra_lines)
    # A second line with an id already used is an error of its own.
    lines.append(json.dumps({"custom_id": "chat", "method": "POST", "url": GOOD["chat"][0], "body": GOOD["chat"][1]}))
    path.write_text("\n".join(lines) + "\n")
    return len([ln for ln in lines if ln])


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_batch(*argv) -> int:
    return fastserve_main(["run-batch", *map(str, argv)])


def server_answers(checkpoint) -> dict:
    from server_harness import ServerThread

    server = ServerThread(["--model", str(checkpoint), *ENGINE]).start()
    try:

        async def ask():
            out = {}
            async with aiohttp.ClientSession() as s:
                for cid, (url, body) in GOOD.items():
                    async with s.post(server.base_url + url, json=body) as r:
                        assert r.status == 200, await r.text()
                        out[cid] = await r.json()
            return out

        return asyncio.run(ask())
    finally:
        server.stop()


def _rounded(x):
    """Logprobs to 3 decimals: a batch of other requests changes float32 sums in the last bits."""
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def comparable(body: dict) -> dict:
    """A response body without what differs between any two answers (id, created)."""
    return _rounded(
        {"object": body["object"], "model": body["model"], "choices": body["choices"], "usage": body["usage"]}
    )


def test_good_bad_summary_and_resume(full, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    total = write_input(inp)
    assert run_batch("-i", inp, "-o", out, "--model", full, *ENGINE) == 0
    recs = records(out)
    by_id = {}
    for r in recs:
        by_id.setdefault(r["custom_id"], []).append(r)
    expected = server_answers(full)
    for cid in GOOD:
        ok = [r for r in by_id[cid] if r["error"] is None]
        assert len(ok) == 1, by_id[cid]
        assert ok[0]["response"]["status_code"] == 200
        assert comparable(ok[0]["response"]["body"]) == comparable(expected[cid]), cid
    two = next(r for r in by_id["two-prompts"] if r["error"] is None)["response"]["body"]
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]
    for cid, (_, status, param) in BAD.items():
        (r,) = by_id[cid]
        assert r["response"]["status_code"] == status and r["response"]["body"] is None, r
        assert r["error"]["param"] == param and r["error"]["message"], r
    lines = {r["line"]: r for r in by_id[None]}
    assert set(lines) == {13, 14} and all(r["error"]["type"] == "invalid_request_error" for r in lines.values())
    dup = [r for r in by_id["chat"] if r["error"] is not None]
    assert len(dup) == 1 and dup[0]["error"]["param"] == "custom_id"
    assert len(recs) == total

    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["total_samples"] == total and summary["completed"] == len(GOOD)
    assert summary["failed"] == total - len(GOOD) and summary["skipped"] == 0
    assert summary["inference_time_seconds"] > 0
    assert summary["throughput_samples_per_sec"] == pytest.approx(total / summary["inference_time_seconds"])
    assert summary["output_tokens"] == sum(expected[c]["usage"]["completion_tokens"] for c in GOOD)
    assert summary["input_tokens"] == sum(expected[c]["usage"]["prompt_tokens"] for c in GOOD)
    assert summary["output_tokens_per_sec"] == pytest.approx(
        summary["output_tokens"] / summary["inference_time_seconds"]
    )

    # Interrupted run: two answers lost and the last line cut short; resuming redoes exactly those.
    kept = [r for r in recs if r["custom_id"] not in ("chat", "two-prompts")]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "half-writ')
    assert run_batch("-i", inp, "-o", out, "--model", full, *ENGINE) == 0
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["completed"] == 2 and summary["skipped"] == total - 3
    # the duplicate "chat" line is answered again as a duplicate: its first line was redone
    assert summary["failed"] == 1
    again = records(out)  # the half line is gone: every line parses
    assert len(again) == len(kept) + 3
    redone = {r["custom_id"]: r for r in again[len(kept) :] if r["error"] is None}
    assert comparable(redone["chat"]["response"]["body"]) == comparable(expected["chat"])
    assert comparable(redone["two-prompts"]["response"]["body"]) == comparable(expected["two-prompts"])

    # Nothing left to do: everything is skipped.
    assert run_batch("-i", inp, "-o", out, "--model", full, *ENGINE) == 0
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["skipped"] == total and summary["completed"] == summary["failed"] == 0
    assert len(records(out)) == len(again)
    # --overwrite starts over.
    assert run_batch("-i", inp, "-o", out, "--model", full, "--overwrite", *ENGINE) == 0
    assert len(records(out)) == total


def test_bad_flags_exit_2(full, tmp_path, caplog):
    assert run_batch("-i", tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl", "--model", full, *ENGINE) == 2
    assert "is not a file" in caplog.text


def _ids_input(path, n=7):
    lines = [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {
                    "prompt": [3 + i, 40 + 7 * i, 900 - i, 11 * i + 1][: 2 + i % 3],
                    "max_tokens": 4 + i % 3,
                    "temperature": 0,
                },
            }
        )
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "parallel", [["--data-parallel-size", "2"], ["--tensor-parallel-size", "2"]], ids=["dp2", "tp2"]
)
def test_parallel_runs_match_one_engine(small, tmp_path, parallel):
    inp = tmp_path / "in.jsonl"
    _ids_input(inp)
    engine = ["--model", small, "--tokenizer", TOKENIZER, *ENGINE]
    assert run_batch("-i", inp, "-o", tmp_path / "one.jsonl", *engine) == 0
    assert run_batch("-i", inp, "-o", tmp_path / "par.jsonl", *engine, *parallel, "--max-in-flight", 3) == 0

    def texts(name):
        return {r["custom_id"]: [c["text"] for c in r["response"]["body"]["choices"]] for r in records(tmp_path / name)}

    one = texts("one.jsonl")
    assert len(one) == 7 and texts("par.jsonl") == one
    summary = json.loads((tmp_path / "par.summary.json").read_text())
    assert summary["completed"] == 7 and summary["failed"] == 0
