"""Tensor parallelism: one process per rank, the driver (rank 0) included.

The driver is the engine's own process: it runs the Rust scheduler, its shard of the model
and the sampler. Ranks 1..N-1 are `multiprocessing` spawn children (no torchrun) running
`worker_main`: join the group, receive the engine's settings from the driver, load their
shard, then loop { receive the step's packed Batch (batch_transport.py); run the forward
pass and the LM head's all-gathers } until the driver says stop or goes away.

Who samples: only rank 0. After the LM head's all-gather every rank holds identical full
logits, so every rank *could* sample identically (the sampler is deterministic given the
seeds), but the result is only consumed by the driver's scheduler, and sampling on the
workers would need the per-sequence sampler state (worker/sampler_state.py) kept too
and would spend a top-k/top-p sort over the vocabulary per rank per step for nothing.

Devices: NCCL on GPUs, rank r on cuda:(r mod ranks-per-node); gloo on CPU. Several nodes:
FASTSERVE_NNODES / MASTER_ADDR / MASTER_PORT on node 0, `python -m fastserve.distributed.node`
on the others (node.py)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import traceback

import torch
import torch.distributed as dist

from fastserve.distributed import parallel_state as ps
from fastserve.distributed.batch_transport import BatchReceiver, BatchSender
from fastserve.distributed.messages import WorkerFailed, WorkerStarted
from fastserve.distributed.process_utils import (
    child_start_context,
    ignore_sigint,
    start_parent_watchdog,
    stop_process,
)

logger = logging.getLogger("fastserve")

_STARTUP_TIMEOUT_S = 600


def check_tensor_parallel_size(model_config, tp: int, ranks_per_node: int | None = None) -> None:
    """ValueError, naming --tensor-parallel-size, for a size this model or machine cannot run."""
    if tp == 1:
        return
    c = model_config
    flag = f"--tensor-parallel-size (tensor_parallel_size={tp})"
    if c.num_attention_heads % tp:
        raise ValueError(
            f"{flag} must divide the model's num_attention_heads ({c.num_attention_heads}): "
            f"pick a divisor of {c.num_attention_heads}"
        )
    if c.num_kv_heads % tp and tp % c.num_kv_heads:
        raise ValueError(
            f"{flag} must divide num_key_value_heads ({c.num_kv_heads}) or be a multiple of it "
            "(KV heads are split, or replicated when there are fewer than ranks)"
        )
    if c.intermediate_size % tp:
        raise ValueError(f"{flag} must divide the model's intermediate_size ({c.intermediate_size})")
    local = tp if ranks_per_node is None else ranks_per_node
    if c.device.type == "cuda" and local > torch.cuda.device_count():
        raise ValueError(
            f"{flag} needs {local} GPUs on this node but {torch.cuda.device_count()} are visible to this "
            "process: lower it or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
        )


def node_layout(tp: int) -> tuple[int, int, str]:
    """(number of nodes, this node's rank, rendezvous address) of a tensor-parallel group.
    One node unless FASTSERVE_NNODES says otherwise; then MASTER_ADDR:MASTER_PORT (node 0,
    where the driver runs) is where every rank meets."""
    nnodes = int(os.environ.get("FASTSERVE_NNODES", "1"))
    if nnodes == 1:
        return 1, 0, f"tcp://127.0.0.1:{ps.get_open_port()}"
    if nnodes < 1 or tp % nnodes:
        raise ValueError(
            f"--tensor-parallel-size ({tp}) must be a multiple of FASTSERVE_NNODES ({nnodes}): "
            "every node runs the same number of ranks"
        )
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise ValueError("FASTSERVE_NNODES > 1 needs MASTER_ADDR and MASTER_PORT (node 0's address and a free port)")
    return nnodes, int(os.environ.get("FASTSERVE_NODE_RANK", "0")), f"tcp://{addr}:{port}"


def local_device(device_type: str, rank: int, ranks_per_node: int) -> torch.device:
    return torch.device("cuda", rank % ranks_per_node) if device_type == "cuda" else torch.device("cpu")


def worker_main(rank: int, world_size: int, init_method: str, device: torch.device, conn) -> None:
    """One non-driver rank. Its EngineArgs and ModelConfig come from the driver once the
    group is up (one pickle at start-up), so a rank on another node cannot run with
    settings that differ from the driver's: mismatched shapes would deadlock a collective."""
    ignore_sigint()
    start_parent_watchdog(conn)
    try:
        conn.send(WorkerStarted(rank))
        from fastserve.worker.model_runner import ModelRunner

        ps.init_tensor_parallel(rank, world_size, init_method, device)
        box = [None, None]
        dist.broadcast_object_list(box, src=0, group=ps.cpu_group())
        args, model_config = box
        runner = ModelRunner(args, dataclasses.replace(model_config, device=device))
        receiver = BatchReceiver(ps.cpu_group())
        while (batch := receiver.recv()) is not None:
            runner.execute_model(batch)
        os._exit(0)
    except BaseException:  # noqa: BLE001 - report to the parent, whatever it was
        try:
            conn.send(WorkerFailed(rank, traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)


def spawn_workers(ranks, world_size: int, init_method: str, device_type: str, ranks_per_node: int):
    """Start `ranks` as spawn children of this process: [(process, parent pipe end)]."""
    ctx = mp.get_context("spawn")
    started = []
    for rank in ranks:
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(
            target=worker_main,
            name=f"fastserve-tp-rank{rank}",
            daemon=True,
            args=(rank, world_size, init_method, local_device(device_type, rank, ranks_per_node), child_conn),
        )
        with child_start_context():
            proc.start()
        child_conn.close()
        started.append((proc, parent_conn))
    return started


class TensorParallelExecutor:
    """Starts this node's ranks 1..L-1, joins the group as rank 0 and builds the driver's
    ModelRunner (`self.runner`); its execute() broadcasts each Batch before the runner's own
    forward pass. With FASTSERVE_NNODES > 1 the other nodes' ranks come from
    `python -m fastserve.distributed.node` there."""

    def __init__(self, args, model_config):
        from fastserve.worker.model_runner import ModelRunner

        tp = args.tensor_parallel_size
        nnodes, node_rank, init_method = node_layout(tp)
        if node_rank != 0:
            raise ValueError(
                f"FASTSERVE_NODE_RANK={node_rank}: the engine (driver) runs on node 0; on the other "
                "nodes run `python -m fastserve.distributed.node`"
            )
        per_node = tp // nnodes
        check_tensor_parallel_size(model_config, tp, ranks_per_node=per_node)
        device_type = model_config.device.type
        self.model_config = dataclasses.replace(model_config, device=local_device(device_type, 0, per_node))
        self._procs: list = []
        self._conns: list = []
        self._closed = False
        self._joined = False
        try:
            for proc, conn in spawn_workers(range(1, per_node), tp, init_method, device_type, per_node):
                self._procs.append(proc)
                self._conns.append(conn)
            for conn in self._conns:
                self._expect_started(conn)
            ps.init_tensor_parallel(0, tp, init_method, self.model_config.device)
            self._joined = True
            # The test hook runs in the driver only; it need not (and may not) pickle.
            dist.broadcast_object_list(
                [dataclasses.replace(args, step_hook=None), self.model_config], src=0, group=ps.cpu_group()
            )
            self.runner = ModelRunner(args, self.model_config)
            self.num_blocks = self.runner.num_blocks
            self.sender = BatchSender(ps.cpu_group())
        except BaseException as e:
            errors = self._worker_errors()
            self.shutdown()
            if errors:
                raise RuntimeError("tensor-parallel worker failed during start-up:\n" + "\n".join(errors)) from e
            raise
        logger.info(
            "tensor parallel: %d ranks on %d node(s) (%s), local worker pids %s",
            tp,
            nnodes,
            device_type,
            self.worker_pids,
        )

    def execute(self, batch, prompt_logprobs_k: int = 0, grammar=None):
        """The driver's step: checked, sent to every rank, then run here (the only rank
        that samples, so the only one a grammar mask concerns)."""
        self.runner.check(batch)
        self.sender.send(batch)
        result = self.runner.execute(batch, prompt_logprobs_k, grammar)
        self.sender.step_open = False  # the result's host copies waited for every collective
        return result

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _expect_started(self, conn) -> None:
        if not conn.poll(_STARTUP_TIMEOUT_S):
            raise RuntimeError(f"a tensor-parallel worker did not start within {_STARTUP_TIMEOUT_S} s")
        try:
            msg = conn.recv()
        except EOFError:
            raise RuntimeError("a tensor-parallel worker exited during start-up") from None
        if isinstance(msg, WorkerFailed):
            raise RuntimeError(f"tensor-parallel rank {msg.rank} failed during start-up:\n{msg.traceback}")

    def _worker_errors(self) -> list[str]:
        errors = []
        for conn in self._conns:
            try:
                # A failing rank reports within moments of the driver noticing it.
                while conn.poll(2.0):
                    msg = conn.recv()
                    if isinstance(msg, WorkerFailed):
                        errors.append(f"rank {msg.rank}:\n{msg.traceback}")
                        break
            except (EOFError, OSError):
                continue
        return errors

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        sender = getattr(self, "sender", None)
        if sender is not None:
            sender.stop()  # reaches ranks on other nodes too; local ones also have pipes
        for proc, conn in zip(self._procs, self._conns):
            stop_process(proc, conn)
        if self._joined:
            ps.destroy_tensor_parallel()
