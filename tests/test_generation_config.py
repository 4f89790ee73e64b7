"""generation_config.json sampling defaults, as vLLM applies them: fields a request leaves
unset take the checkpoint's values (temperature, top_p, top_k, min_p, repetition_penalty,
max_new_tokens as a max_tokens cap), a request's own fields win, and `--generation-config
vllm` / `generation_config="vllm"` turns it off. The effective parameters are read from the
batch the engine actually runs (the step hook sees each new sequence's sampling state)."""

from __future__ import annotations

import json
import logging

import pytest
from fastserve import LLM, SamplingParams
from fastserve.generation_config import apply_to_request, load_generation_defaults
from tiny_models import SHARED_MODELS, make_tiny_checkpoint

TOKENIZER = SHARED_MODELS / "llama3-tokenizer"
GEN = {
    "temperature": 0.7,
    "top_k": 5,
    "top_p": 0.9,
    "repetition_penalty": 1.3,
    "max_new_tokens": 6,
    "do_sample": True,
    "bos_token_id": 1,
}
EXPECTED = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3, "max_tokens": 6}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # The real vocabulary, so chat prompts (rendered by the llama3 template) fit the model.
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("gen"), tokenizer_dir=TOKENIZER)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **GEN}))
    return path


class Recorder:
    """Step hook: the sampling arrays of every batch the engine ran."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, int, float, float]] = []

    def __call__(self, batch) -> None:
        # Each sequence's sampling state travels once, with the first batch that names it.
        for t, k, p, r in zip(
            batch.new_temperature.tolist(),
            batch.new_top_k.tolist(),
            batch.new_top_p.tolist(),
            batch.new_repetition_penalty.tolist(),
        ):
            self.rows.append((round(t, 4), k, round(p, 4), round(r, 4)))

    def take(self) -> set:
        rows, self.rows = set(self.rows), []
        return rows


def test_load_reads_the_sampling_fields_only(checkpoint, tmp_path):
    assert load_generation_defaults(str(checkpoint)) == EXPECTED
    assert load_generation_defaults(str(checkpoint), "vllm") == {}
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "min_p": 0.05}))
    assert load_generation_defaults(str(checkpoint), str(other)) == {"temperature": 0.2, "min_p": 0.05}
    assert load_generation_defaults(str(checkpoint), override={"temperature": 0.1})["temperature"] == 0.1
    assert load_generation_defaults(str(tmp_path)) == {}  # no file: nothing to apply
    with pytest.raises(ValueError, match="no generation_config.json"):
        load_generation_defaults(str(checkpoint), str(tmp_path))
    (other / "generation_config.json").write_text(json.dumps({"top_k": "many"}))
    with pytest.raises(ValueError, match="top_k must be a number"):
        load_generation_defaults(str(checkpoint), str(other))
    (other / "generation_config.json").write_text(json.dumps({"top_p": 3.0}))
    with pytest.raises(ValueError, match="top_p"):
        load_generation_defaults(str(checkpoint), str(other))


def test_apply_to_request_precedence():
    d = {"temperature": 0.7, "top_k": 5, "max_tokens": 6}
    assert apply_to_request({"max_tokens": 100}, d) == {"temperature": 0.7, "top_k": 5, "max_tokens": 6}
    assert apply_to_request({"max_tokens": 3, "temperature": 0.0}, d) == {
        "temperature": 0.0,
        "top_k": 5,
        "max_tokens": 3,
    }
    assert apply_to_request({"max_tokens": 3}, {}) == {"max_tokens": 3}


def _llm(path, hook, **kw):
    return LLM(
        str(path),
        tokenizer=str(TOKENIZER),
        device="cpu",
        dtype="float32",
        max_model_len=128,
        cpu_kv_cache_space_gb=0.01,
        seed=0,
        step_hook=hook,
        **kw,
    )


def test_offline_defaults_apply_when_no_sampling_params(checkpoint, caplog):
    prompts = [[5, 6, 7], [8, 9]]
    hook = Recorder()
    with caplog.at_level(logging.INFO, logger="fastserve"):
        llm = _llm(checkpoint, hook)
    try:
        assert "temperature=0.7" in caplog.text and "top_k=5" in caplog.text  # logged at start
        assert llm.get_default_sampling_params() == SamplingParams(
            temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, max_tokens=6
        )
        outs = llm.generate(prompt_token_ids=prompts, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
        assert hook.take() == {(0.7, 5, 0.9, 1.3)}
        # Explicit SamplingParams are taken as they are (vLLM's offline rule).
        outs = llm.generate(
            prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False
        )
        assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3]
        assert hook.take() == {(0.0, 0, 1.0, 1.0)}
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
        assert hook.take() == {(0.7, 5, 0.9, 1.3)}
    finally:
        llm.shutdown()


def test_offline_generation_config_vllm_turns_it_off(checkpoint):
    hook = Recorder()
    llm = _llm(checkpoint, hook, generation_config="vllm")
    try:
        assert llm.get_default_sampling_params() == SamplingParams()
        outs = llm.generate(prompt_token_ids=[[5, 6, 7]], use_tqdm=False)
        assert len(outs[0].outputs[0].token_ids) == 16  # SamplingParams' max_tokens
        assert hook.take() == {(1.0, 0, 1.0, 1.0)}
    finally:
        llm.shutdown()


def _server(checkpoint, hook, *extra):
    from server_harness import ServerThread

    return ServerThread(
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
            "--served-model-name",
            "tiny",
            *extra,
        ],
        step_hook=hook,
    ).start()


def _post(base, path, body):
    import asyncio

    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(base + path, json=body) as r:
                return r.status, await r.json()

    return asyncio.run(go())


def test_server_fills_unset_fields_from_generation_config(checkpoint):
    hook = Recorder()
    server = _server(checkpoint, hook)
    try:
        status, body = _post(server.base_url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 50})
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 6  # max_new_tokens caps the request's 50
        assert hook.take() == {(0.7, 5, 0.9, 1.3)}
        status, body = _post(
            server.base_url,
            "/v1/completions",
            {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.3, "top_k": 2, "repetition_penalty": 1.0},
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        assert hook.take() == {(0.3, 2, 0.9, 1.0)}  # the request's own fields win; top_p still the config's
        status, body = _post(server.base_url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 6  # no max_tokens: the config's cap
        assert hook.take() == {(0.7, 5, 0.9, 1.3)}
    finally:
        server.stop()


def test_server_generation_config_vllm(checkpoint):
    hook = Recorder()
    server = _server(checkpoint, hook, "--generation-config", "vllm")
    try:
        status, body = _post(server.base_url, "/v1/completions", {"prompt": [5, 6, 7]})
        assert status == 200 and body["usage"]["completion_tokens"] == 16
        assert hook.take() == {(1.0, 0, 1.0, 1.0)}
    finally:
        server.stop()


def test_server_refuses_to_start_on_a_bad_generation_config(tmp_path):
    import asyncio

    from fastserve.server.app import start_server
    from fastserve.server.cli import parse_args
    from server_harness import free_port

    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, vocab_size=1000)
    (path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    args = parse_args(
        ["--model", str(path), "--tokenizer", str(TOKENIZER), "--device", "cpu", "--port", str(free_port())]
    )

    async def go():
        server = await start_server(args)
        try:
            with pytest.raises(ValueError, match="temperature"):
                await server.loaded
        finally:
            await server.stop()

    asyncio.run(go())
