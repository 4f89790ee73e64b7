"""Security properties of the server, on a real server (tiny checkpoint, 127.0.0.1): the API
key guards every route but the documented open ones and is compared in constant time;
checkpoints never run pickled code (nor, with trust_remote_code, their own Python: see
test_model_resolver.py); the chat template is read once at start."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib

import aiohttp
import fastserve.server.app as app_module
import pytest
import torch
from server_harness import (
    QWEN_TOKENIZER,
    ServerThread,
    tiny_qwen_checkpoint,
)

pytestmark = pytest.mark.timeout(120)

API_KEY = "sk-" + os.urandom(8).hex()
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
# What README.md promises stays open with --api-key (plus /ping, /health's alias).
DOCUMENTED_OPEN = {"/health", "/version", "/metrics", "/openapi.json"}
TEMPLATE = (
    "{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "template.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(checkpoint, template_file):
    s = ServerThread(
        ["--model", str(checkpoint), "--device", "cpu", "--api-key", API_KEY, "--chat-template", str(template_file)]
    ).start()
    yield s
    s.stop()


async def _request(method, url, headers, body=None):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, headers=headers, json=body) as r:
            return r.status, await r.read()


def _routes(server) -> list[tuple[str, str]]:
    app = server.server.runner.app
    out = []
    for route in app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            out.append((route.method, path))
    return out


# A body each POST route would accept, so that "not 401" means "got through the auth".
_BODIES = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [100, 200]},
}


def test_api_key_guards_every_route_but_the_open_ones(server):
    routes = _routes(server)
    paths = {p for _, p in routes}
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= paths
    readme = README.read_text()
    for p in DOCUMENTED_OPEN:
        assert f"`{p}`" in readme  # listed as open in the README's API-key paragraph
    open_paths = DOCUMENTED_OPEN | {"/ping"}
    wrong = [
        {},
        {"Authorization": "Bearer " + API_KEY[:-1]},
        {"Authorization": "Bearer " + API_KEY + "x"},
        {"Authorization": API_KEY},
        {"Authorization": "Bearer " + "ключ"},
    ]

    async def main():
        results = []
        for method, path in routes:
            url = server.base_url + path
            body = _BODIES.get(path) if method == "POST" else None
            for headers in wrong:
                status, data = await _request(method, url, headers, body)
                results.append((method, path, headers, status, data))
            status, data = await _request(method, url, {"Authorization": f"Bearer {API_KEY}"}, body)
            results.append((method, path, "right", status, data))
        return results

    for method, path, headers, status, data in asyncio.run(main()):
        if headers == "right" or path in open_paths:
            assert status == 200, (method, path, headers, data)
        else:
            assert status == 401, (method, path, headers, status)
            err = json.loads(data)["error"]
            assert err["code"] == "invalid_api_key" and API_KEY not in err["message"]
    # an unknown route does not tell an unauthenticated caller what exists
    status, _ = asyncio.run(_request("GET", server.base_url + "/v1/secret", {}))
    assert status == 401


def test_api_key_compared_in_constant_time(server, monkeypatch):
    """The key check goes through hmac.compare_digest (whose time does not depend on where
    the first differing byte is), for a right key and a wrong one alike."""
    import hmac

    calls = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", recording)
    url = server.base_url + "/v1/models"
    assert asyncio.run(_request("GET", url, {"Authorization": f"Bearer {API_KEY}"}))[0] == 200
    assert asyncio.run(_request("GET", url, {"Authorization": "Bearer nope"}))[0] == 401
    assert len(calls) == 2 and all(b == f"Bearer {API_KEY}".encode() for _, b in calls)


def test_chat_template_read_once(server, template_file):
    """Changing the --chat-template file after start changes nothing: the server renders
    with the template it read at start."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    messages = [{"role": "user", "content": "What is two plus two?"}]

    async def render_and_chat():
        status, data = await _request("POST", server.base_url + "/tokenize", headers, {"messages": messages})
        assert status == 200, data
        status, chat = await _request(
            "POST",
            server.base_url + "/v1/chat/completions",
            headers,
            {"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
        )
        assert status == 200, chat
        return json.loads(data)["tokens"], json.loads(chat)["choices"][0]["message"]["content"]

    tokens, text = asyncio.run(render_and_chat())
    status, data = asyncio.run(_request("POST", server.base_url + "/detokenize", headers, {"tokens": tokens}))
    assert status == 200, data
    assert json.loads(data)["prompt"] == "<<user>> What is two plus two?\n<<assistant>>"
    template_file.write_text("{{ raise_exception('this file must not be read again') }}")
    try:
        assert asyncio.run(render_and_chat()) == (tokens, text)
    finally:
        template_file.write_text(TEMPLATE)


class _Touch:
    """A pickle payload that would create a file if it were ever unpickled with code."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_server_refuses_pickled_code_in_checkpoint(tmp_path):
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(
        "LlamaForCausalLM",
        tmp_path / "ckpt",
        save_format="bin",
        tokenizer_dir=QWEN_TOKENIZER,
        max_position_embeddings=128,
    )
    marker = tmp_path / "pwned"
    weights = torch.load(path / "pytorch_model.bin", weights_only=True)
    weights["model.norm.weight"] = _Touch(marker)
    torch.save(weights, path / "pytorch_model.bin")
    s = ServerThread(["--model", str(path), "--device", "cpu"])
    try:
        with pytest.raises(Exception, match="[Ww]eights only"):
            s.start()
        status, data = asyncio.run(_request("GET", s.base_url + "/health", {}))
        assert status == 503 and json.loads(data)["error"]["code"] == "model_load_failed"
    finally:
        s.stop()
    assert not marker.exists()
