"""Data parallelism for the offline LLM: M engine replicas, each an `LLM` in its own process.

A generate() call validates every prompt here, deals the prompts out round-robin (so a
length-sorted prompt list still splits evenly), sends each replica its share in ONE message,
and puts the outputs back in input order. Messages carry a call id: a call interrupted in
the parent (Ctrl+C) leaves its late results to be recognised and dropped by the next call.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing.connection as mpc
import traceback

from tqdm.auto import tqdm

from fastserve.distributed.messages import CallResult, GenerateCall, RemoteError
from fastserve.distributed.process_utils import STOP, ignore_sigint, start_parent_watchdog
from fastserve.distributed.replicas import ReplicaFrontEnd, ready_message

logger = logging.getLogger("fastserve")


def _replica_main(index: int, args, lifeline, conn) -> None:
    ignore_sigint()
    start_parent_watchdog(lifeline)
    try:
        from fastserve.engine.llm import LLM

        kwargs = {f: getattr(args, f) for f in type(args).field_names()}
        llm = LLM(**kwargs)
        conn.send(ready_message(llm.engine))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        conn.send(RemoteError.of(e, traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            msg = STOP
        if msg == STOP:
            llm.shutdown()
            return
        try:
            outputs = llm.generate(msg.prompts, msg.params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - this call fails; the replica keeps serving
            conn.send(CallResult(msg.call_id, error=RemoteError.of(e, traceback.format_exc())))
            continue
        conn.send(CallResult(msg.call_id, outputs))


class OfflineReplicas(ReplicaFrontEnd):
    """What LLM needs of an engine (tokenizer, model_config, validate_prompt, shutdown),
    with generate_split() in place of the step loop."""

    def __init__(self, args):
        self._calls = itertools.count()
        self._closed = False
        self._start_replicas(args, _replica_main)
        logger.info("data parallel: %d replicas, pids %s", len(self.replicas), self.replica_pids)

    def generate_split(self, texts, token_lists, params, use_tqdm: bool):
        if self._closed:
            raise RuntimeError("the LLM was shut down")
        call_id = next(self._calls)
        m = len(self.replicas)
        pending = {}
        for k, rep in enumerate(self.replicas):
            idx = list(range(k, len(token_lists), m))
            if not idx:
                continue
            prompts = [{"prompt_token_ids": token_lists[i], "prompt": texts[i]} for i in idx]
            rep.conn.send(GenerateCall(call_id, prompts, [params[i] for i in idx]))
            pending[rep.conn] = (rep, idx)
        results = [None] * len(token_lists)
        failure = None
        bar = tqdm(total=len(token_lists), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while pending:
                for conn in mpc.wait(list(pending)):
                    rep, idx = pending[conn]
                    try:
                        res: CallResult = conn.recv()
                    except (EOFError, OSError):
                        raise RuntimeError(
                            f"data-parallel replica {rep.index} died (exit code {rep.proc.exitcode})"
                        ) from None
                    if res.call_id != call_id:
                        continue  # a result of an earlier, interrupted call
                    del pending[conn]
                    if res.error is not None:
                        failure = failure or res.error
                        continue
                    for i, out in zip(idx, res.outputs):
                        results[i] = out
                    bar.update(len(idx))
        finally:
            bar.close()
        if failure is not None:
            failure.raise_in("generate failed in a data-parallel replica")
        return results

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for r in self.replicas:
            r.stop()
