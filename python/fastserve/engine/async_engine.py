"""AsyncEngine: the Engine's step loop on its own thread, bridged to asyncio.

The event loop never runs a step: requests and aborts go to the step thread through an
inbox; each step's outputs come back in ONE call_soon_threadsafe (not one per request),
which fans them out to the per-request queues. Torch and the Rust core release the GIL
during their heavy work, so the HTTP side keeps running while the GPU works."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator

from fastserve.distributed.messages import AbortRequest, AddRequest
from fastserve.engine.arg_utils import EngineArgs
from fastserve.engine.engine import Engine
from fastserve.errors import EngineDeadError, InvalidRequest, RequestError  # noqa: F401 - re-exported for the server
from fastserve.outputs import RequestOutput
from fastserve.sampling_params import SamplingParams

logger = logging.getLogger("fastserve")


class AsyncEngine:
    """One engine behind the EngineClient protocol (fastserve.engine.client): its step loop
    runs on a thread; callers' add/abort messages reach it through the inbox."""

    def __init__(self, args: EngineArgs):
        self.engine = Engine(args)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.served_model_names = self.engine.served_model_names
        # The server compiles grammars here first (in its pool, off the step thread), so a bad
        # constraint is a 400 before the request is queued and the engine finds it cached.
        self.structured = self.engine.structured
        self._inbox: collections.deque[AddRequest | AbortRequest] = collections.deque()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead_error: BaseException | None = None
        # Resolves when the step loop dies: the server exits rather than linger half-alive.
        self.died: asyncio.Future | None = None
        self._stats = self.engine.stats()

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.died = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="fastserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        # Tensor-parallel workers go with the engine, not only when this process exits.
        self.engine.shutdown()

    def stats(self) -> dict:
        return dict(self._stats)

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        return self.engine.validate_prompt(prompt_token_ids, params)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.dead_error!r}")
        if self._thread is None:
            raise RuntimeError("AsyncEngine.start() was not awaited")
        if request_id in self._queues:
            raise InvalidRequest(f"request_id {request_id!r} is already running", "request_id")
        # Fail fast, in the caller, on anything the engine would refuse.
        prompt_token_ids = self.engine.validate_prompt(list(prompt_token_ids), params)
        params.to_core(self.tokenizer)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._inbox.append(AddRequest(request_id, prompt_token_ids, params, prompt))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                # Cancelled (client gone) or the consumer stopped early: free its blocks now.
                self._inbox.append(AbortRequest(request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.append(AbortRequest(request_id))
        self._wake.set()

    # -- the step thread --------------------------------------------------------------------

    def _drain_inbox(self) -> list[tuple[str, BaseException]]:
        failed = []
        while self._inbox:
            msg = self._inbox.popleft()
            if isinstance(msg, AddRequest):
                try:
                    self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, prompt=msg.prompt)
                except Exception as e:  # a request the core refuses fails alone
                    failed.append((msg.request_id, e))
            else:
                self.engine.abort_request(msg.request_id)
        return failed

    def _run(self) -> None:
        try:
            while not self._stopping:
                failed = self._drain_inbox()
                if failed:
                    self._post([(rid, err) for rid, err in failed])
                if not self.engine.has_unfinished():
                    self._stats = self.engine.stats()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                states = self.engine.step()
                self._stats = self.engine.stats()
                if states:
                    errors = self.engine.request_errors
                    self._post([(s.request_id, errors.pop(s.request_id, None) or s.to_output()) for s in states])
        except BaseException as e:  # noqa: BLE001 - the loop cannot continue; everyone must know
            logger.exception("engine step loop died")
            self.dead_error = e
            err = EngineDeadError(f"the engine stopped after an error: {e!r}")
            self._post_all(err)
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._set_died, e)

    def _set_died(self, e: BaseException) -> None:
        if self.died is not None and not self.died.done():
            self.died.set_result(e)

    def _post(self, items) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, items)

    def _post_all(self, err: BaseException) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: [q.put_nowait(err) for q in self._queues.values()])

    def _dispatch(self, items) -> None:
        for rid, item in items:
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(item)
