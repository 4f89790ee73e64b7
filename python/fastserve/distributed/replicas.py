"""Data-parallel replica processes: the part the offline and the async front ends share.

Each replica is a whole engine (tensor parallel or not) in a spawned process of its own,
with two pipes to the parent:
- a lifeline (process_utils.start_parent_watchdog): EOF or "stop" ends the replica, so no
  replica outlives its parent, and shutdown needs no cooperation from a busy replica;
- a command pipe, for requests in and outputs out.
Replicas are non-daemonic because a tensor-parallel replica starts worker processes of its
own (daemonic processes may not have children); the lifeline is what bounds their life.

GPUs: replica i of size tp gets GPUs [i*tp, (i+1)*tp) of the parent's visible ones through
CUDA_VISIBLE_DEVICES, so inside it they are cuda:0..tp-1 as the tensor-parallel code expects.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import multiprocessing.connection as mpc
import os

from fastserve.distributed.messages import Ready, RemoteError
from fastserve.distributed.process_utils import STOP, child_start_context, stop_process

_START_TIMEOUT_S = 1800  # model load + KV profiling + CUDA graph capture + kernel warm-up


def replica_args(args, index: int):
    """The EngineArgs one replica runs with. Each replica gets its own seed so requests
    without a seed do not draw the same random streams on every replica."""
    return dataclasses.replace(args, data_parallel_size=1, step_hook=None, seed=args.seed + index)


def _visible_gpus() -> list[str]:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def replica_gpu_sets(args, device_type: str) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES value per replica (None on CPU); ValueError when the GPUs are
    too few for data_parallel_size x tensor_parallel_size."""
    dp, tp = args.data_parallel_size, args.tensor_parallel_size
    if device_type != "cuda":
        return [None] * dp
    gpus = _visible_gpus()
    if dp * tp > len(gpus):
        raise ValueError(
            f"--data-parallel-size ({dp}) x --tensor-parallel-size ({tp}) needs {dp * tp} GPUs but "
            f"{len(gpus)} are visible: lower one of them or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
        )
    return [",".join(gpus[i * tp : (i + 1) * tp]) for i in range(dp)]


class ReplicaProcess:
    def __init__(self, ctx, target, index: int, args, cuda_visible: str | None):
        self.index = index
        self.lifeline, child_lifeline = ctx.Pipe()
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=target,
            name=f"fastserve-dp-replica{index}",
            daemon=False,
            args=(index, args, child_lifeline, child_conn),
        )
        with child_start_context({"CUDA_VISIBLE_DEVICES": cuda_visible} if cuda_visible is not None else None):
            self.proc.start()
        child_lifeline.close()
        child_conn.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self):
        """The replica's Ready message; RuntimeError with its traceback if it failed."""
        ready = mpc.wait([self.conn, self.proc.sentinel], timeout=_START_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"data-parallel replica {self.index} did not start within {_START_TIMEOUT_S} s")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(
                f"data-parallel replica {self.index} exited during start-up (exit code {self.proc.exitcode})"
            ) from None
        if isinstance(msg, RemoteError):
            msg.raise_in(f"data-parallel replica {self.index} failed during start-up")
        return msg

    def stop(self, grace_s: float = 10.0) -> None:
        """Ask on the command pipe (the replica exits normally: its own workers stopped, its
        semaphores released), then fall back to the lifeline, terminate, kill."""
        try:
            self.conn.send(STOP)
        except (OSError, ValueError):
            pass
        self.proc.join(grace_s)
        stop_process(self.proc, self.lifeline)
        try:
            self.conn.close()
        except OSError:
            pass


def start_replicas(target, args, model_config) -> list[ReplicaProcess]:
    """Start every replica (in parallel) and wait until all are ready; on any failure the
    others are stopped and the first error is raised. Sizes are checked here first, so a
    bad --tensor-parallel-size fails once, before M engines start loading."""
    from fastserve.distributed.executor import check_tensor_parallel_size

    gpu_sets = replica_gpu_sets(args, model_config.device.type)
    check_tensor_parallel_size(model_config, args.tensor_parallel_size)
    ctx = mp.get_context("spawn")
    replicas: list[ReplicaProcess] = []
    try:
        for i, gpus in enumerate(gpu_sets):
            replicas.append(ReplicaProcess(ctx, target, i, replica_args(args, i), gpus))
        for r in replicas:
            r.ready_info = r.wait_ready()
    except BaseException:
        for r in replicas:
            r.stop()
        raise
    return replicas


class ReplicaFrontEnd:
    """What both data-parallel front ends share: the engine-like face the LLM and the server
    read (model_config, tokenizer, served_model_names, validate_prompt) and the replicas."""

    def _start_replicas(self, args, target) -> None:
        from fastserve._core import Tokenizer
        from fastserve.config import ModelConfig
        from fastserve.engine.engine import _tokenizer_dir
        from fastserve.model_resolver import resolve_engine_args
        from fastserve.worker.model_runner import resolve_device

        args = resolve_engine_args(args)  # once here: the replicas get local directories
        device = resolve_device(args.device)
        # Parsed as for the CPU: resolving dtype "auto" for a GPU queries the device, which
        # would give this process, which runs no model, a CUDA context and its memory. The
        # replicas report the dtype they run in.
        cfg = ModelConfig.from_pretrained(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            device="cpu",
            seed=args.seed,
            quantization=args.quantization,
            load_format=args.load_format,
        )
        self.model_config = dataclasses.replace(cfg, device=device)
        self.tokenizer = Tokenizer(_tokenizer_dir(args.tokenizer or args.model))
        self.served_model_names = list(args.served_model_name or [args.model])
        # Grammars compiled here too, to refuse a bad constraint (a 400, a ValueError) before a
        # replica gets it; each replica compiles its own copy off its step loop.
        from fastserve.structured_outputs.manager import StructuredOutputManager

        eos = list(dict.fromkeys(self.tokenizer.eos_token_ids + cfg.eos_token_ids))
        self.structured = StructuredOutputManager(_tokenizer_dir(args.tokenizer or args.model), cfg.vocab_size, eos)
        self.replicas = start_replicas(target, args, self.model_config)
        self.model_config = dataclasses.replace(self.model_config, dtype=self.replicas[0].ready_info.dtype)

    def validate_prompt(self, prompt_token_ids, params):
        from fastserve.engine.engine import Engine

        # The same checks, against the same config, that each replica's engine makes.
        return Engine.validate_prompt(self, prompt_token_ids, params)

    @property
    def replica_pids(self) -> list[int]:
        return [r.pid for r in self.replicas]


def ready_message(engine) -> Ready:
    return Ready(engine.model_config.dtype, engine.stats())
