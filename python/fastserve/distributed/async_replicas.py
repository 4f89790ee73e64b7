"""Data parallelism for the server: M AsyncEngine-shaped replicas behind one front end.

Each replica process runs the ordinary AsyncEngine step loop (`_ReplicaLoop` below) with
the pipe in place of the event loop: a reader thread feeds the loop's inbox from the pipe,
and each step's outputs go back in ONE message (the list of (request id, RequestOutput or
error) the step produced, plus the replica's stats).

The front end (`DataParallelAsyncEngine`) has the AsyncEngine interface the server uses.
A request goes to the least-loaded replica: fewest unfinished requests assigned to it
(running + waiting, counted here so it is exact between steps), ties broken by KV-cache
usage from the replica's last report. stats() sums the replicas'. Any replica's death is
the engine's death (its callers get EngineDeadError, `died` resolves, the server exits):
one replica lost would otherwise silently halve the capacity the operator sized for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import traceback
from collections.abc import AsyncIterator

from fastserve.distributed.messages import AbortRequest, AddRequest, RemoteError, ReplicaDead, StepOutputs
from fastserve.distributed.process_utils import STOP, ignore_sigint, start_parent_watchdog
from fastserve.distributed.replicas import ReplicaFrontEnd, ready_message
from fastserve.engine.async_engine import AsyncEngine, EngineDeadError
from fastserve.errors import InvalidRequest
from fastserve.outputs import RequestOutput
from fastserve.sampling_params import SamplingParams

logger = logging.getLogger("fastserve")


class _ReplicaLoop(AsyncEngine):
    """AsyncEngine's step loop, posting to a pipe instead of an event loop."""

    def __init__(self, args, conn):
        super().__init__(args)
        self.conn = conn

    # Only the step thread sends, so the pipe needs no lock.
    def _post(self, items) -> None:
        wire = [(rid, RemoteError.of(x) if isinstance(x, BaseException) else x) for rid, x in items]
        self.conn.send(StepOutputs(wire, self.engine.stats()))

    def _post_all(self, err: BaseException) -> None:
        self.conn.send(ReplicaDead(repr(self.dead_error or err)))

    def pump(self) -> None:
        """Pipe -> inbox; the loop's own add/abort messages pass through unchanged."""
        try:
            while (msg := self.conn.recv()) != STOP:
                self._inbox.append(msg)
                self._wake.set()
        except (EOFError, OSError):
            pass
        self._stopping = True
        self._wake.set()


def _replica_main(index: int, args, lifeline, conn) -> None:
    ignore_sigint()
    start_parent_watchdog(lifeline)
    try:
        loop = _ReplicaLoop(args, conn)
        conn.send(ready_message(loop.engine))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        conn.send(RemoteError.of(e, traceback.format_exc()))
        return
    threading.Thread(target=loop.pump, name="fastserve-replica-pipe", daemon=True).start()
    loop._run()
    loop.engine.shutdown()
    if not loop._stopping:
        os._exit(1)  # the engine died (and told the parent); no clean-up is owed


class DataParallelAsyncEngine(ReplicaFrontEnd):
    """M replicas behind the EngineClient protocol (fastserve.engine.client)."""

    def __init__(self, args):
        self._owner: dict[str, int] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.dead_error: BaseException | None = None
        self.died: asyncio.Future | None = None
        self._start_replicas(args, _replica_main)
        self._stats = [dict(r.ready_info.stats) for r in self.replicas]
        self._load = [0] * len(self.replicas)  # unfinished requests per replica
        logger.info("data parallel: %d replicas, pids %s", len(self.replicas), self.replica_pids)

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.died = self._loop.create_future()
        for i, rep in enumerate(self.replicas):
            threading.Thread(target=self._read, args=(i,), name=f"fastserve-dp-reader{i}", daemon=True).start()

    async def shutdown(self) -> None:
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._stop_all)

    def _stop_all(self) -> None:
        for r in self.replicas:
            r.stop()

    def stats(self) -> dict:
        total: dict = {}
        for s in self._stats:
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        blocks = total.get("num_total_blocks", 0)
        if blocks:
            total["kv_cache_usage"] = 1.0 - total.get("num_free_blocks", 0) / blocks
        total["data_parallel_size"] = len(self.replicas)
        return total

    def replica_stats(self) -> list[dict]:
        """Each replica's last reported stats (what routing reads)."""
        return [dict(s) for s in self._stats]

    def _pick(self) -> int:
        return min(range(len(self.replicas)), key=lambda i: (self._load[i], self._stats[i].get("kv_cache_usage", 0.0)))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.dead_error!r}")
        if self._loop is None:
            raise RuntimeError("DataParallelAsyncEngine.start() was not awaited")
        if request_id in self._queues:
            raise InvalidRequest(f"request_id {request_id!r} is already running", "request_id")
        prompt_token_ids = self.validate_prompt(list(prompt_token_ids), params)
        params.to_core(self.tokenizer)
        i = self._pick()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._owner[request_id] = i
        self._load[i] += 1
        self.replicas[i].conn.send(AddRequest(request_id, prompt_token_ids, params, prompt))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the replica is done with it (failed alone, or dead)
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            owner = self._owner.pop(request_id, None)
            if owner is not None:
                self._load[owner] -= 1
                if not finished and not self._closed and self.dead_error is None:
                    self.replicas[owner].conn.send(AbortRequest(request_id))

    async def abort(self, request_id: str) -> None:
        owner = self._owner.get(request_id)
        if owner is not None and self.dead_error is None:
            self.replicas[owner].conn.send(AbortRequest(request_id))

    # -- reader threads (one per replica) ----------------------------------------------------

    def _read(self, i: int) -> None:
        conn = self.replicas[i].conn
        try:
            while True:
                msg = conn.recv()
                if isinstance(msg, ReplicaDead):
                    err = RuntimeError(f"data-parallel replica {i}: {msg.reason}")
                    break
                self._stats[i] = msg.stats
                self._post(self._dispatch, msg.items)
        except (EOFError, OSError):
            self.replicas[i].proc.join(1)
            err = RuntimeError(f"data-parallel replica {i} exited (exit code {self.replicas[i].proc.exitcode})")
        if not self._closed:
            logger.error("data-parallel replica %d died: %s", i, err)
            self._post(self._die, err)

    def _post(self, fn, arg) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, arg)

    def _dispatch(self, items) -> None:
        for rid, item in items:
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(item.rebuild() if isinstance(item, RemoteError) else item)

    def _die(self, err: BaseException) -> None:
        if self.dead_error is not None:
            return
        self.dead_error = err
        dead = EngineDeadError(f"the engine stopped after an error: {err!r}")
        for q in self._queues.values():
            q.put_nowait(dead)
        if self.died is not None and not self.died.done():
            self.died.set_result(err)
