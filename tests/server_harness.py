"""A real fastserve server (real engine, real HTTP on 127.0.0.1) on a background thread,
for tests that talk to it with the openai package, aiohttp or fastserve.client."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

from tiny_models import SHARED_MODELS

QWEN_TOKENIZER = SHARED_MODELS / "qwen3-tokenizer"


def subprocess_env() -> dict[str, str]:
    """Environment for a child `python -m fastserve...`: it imports fastserve from where this
    test process did (the source tree with an in-place build, or site-packages in CI)."""
    import fastserve

    root = str(Path(fastserve.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_qwen_checkpoint(tmp_dir) -> Path:
    """Llama architecture, hidden 64, 2 layers, with the real Qwen tokenizer (151,936-row
    embedding) and max_position_embeddings 512 (so length limits are cheap to hit)."""
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(
        "LlamaForCausalLM", tmp_dir, tokenizer_dir=QWEN_TOKENIZER, max_position_embeddings=512, name="tiny-qwen-llama"
    )


class ServerThread:
    """`python -m fastserve` in-process: parses the same CLI flags, serves on its own event
    loop in a daemon thread. `stop()` drains like SIGTERM does."""

    def __init__(self, argv: list[str], step_hook=None) -> None:
        from fastserve.server.app import engine_args_from
        from fastserve.server.cli import parse_args

        self.port = free_port()
        self.args = parse_args([*argv, "--port", str(self.port), "--disable-log-requests"])
        self.engine_args = engine_args_from(self.args)
        self.engine_args.step_hook = step_hook
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="fastserve-test-server")

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.close()

    async def _start(self) -> None:
        from fastserve.server.app import start_server

        self.server = await start_server(self.args, self.engine_args)

    def start(self, wait_loaded: bool = True, timeout: float = 300) -> ServerThread:
        self._thread.start()
        self._started.wait(timeout)
        if self._error is not None:
            raise self._error
        if wait_loaded:
            self.call(self._wait_loaded(), timeout)
        return self

    async def _wait_loaded(self) -> None:
        await asyncio.shield(self.server.loaded)

    def call(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop (e.g. to read engine.stats())."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def state(self):
        return self.server.state

    def stop(self) -> None:
        if self.loop is None or self.server is None:
            return
        try:
            self.call(self.server.stop(), 120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
