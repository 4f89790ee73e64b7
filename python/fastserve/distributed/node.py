"""`python -m fastserve.distributed.node`: the tensor-parallel ranks of one non-driver node.

Node 0 runs the engine as usual (`python -m fastserve ...` or `LLM(...)`) with
FASTSERVE_NNODES, MASTER_ADDR and MASTER_PORT in its environment; every other node runs

    python -m fastserve.distributed.node --tensor-parallel-size 16 --nnodes 2 --node-rank 1 \\
        --master-addr NODE0 --master-port 29500

which starts that node's ranks (one process per GPU) and waits. The ranks receive the
engine's settings from the driver, so the model flags are given once, on node 0 (the model
directory must exist at the same path on every node). This process ends when its ranks do:
when the driver closes the group or dies (gloo notices the closed socket) or on Ctrl+C.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing.connection as mpc
import os
import sys

from fastserve.distributed.executor import spawn_workers
from fastserve.distributed.messages import WorkerFailed
from fastserve.distributed.process_utils import stop_process

logger = logging.getLogger("fastserve")


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m fastserve.distributed.node", description="Run one non-driver node's tensor-parallel ranks."
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        required=True,
        help="The engine's --tensor-parallel-size (ranks on all nodes together).",
    )
    p.add_argument(
        "--nnodes",
        type=int,
        default=int(env("FASTSERVE_NNODES", "0")),
        help="Nodes in the group, node 0 included (default: FASTSERVE_NNODES).",
    )
    p.add_argument(
        "--node-rank",
        type=int,
        default=int(env("FASTSERVE_NODE_RANK", "0")),
        help="This node's index, 1..nnodes-1 (default: FASTSERVE_NODE_RANK).",
    )
    p.add_argument("--master-addr", default=env("MASTER_ADDR"), help="Node 0's address (default: MASTER_ADDR).")
    p.add_argument(
        "--master-port",
        type=int,
        default=int(env("MASTER_PORT", "0")),
        help="The port node 0 listens on (default: MASTER_PORT).",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu"],
        help="Must match the engine's (NCCL on cuda, gloo on cpu).",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    if a.nnodes < 2:
        parser.error("--nnodes must be at least 2 (a one-node engine starts its own ranks)")
    if not 1 <= a.node_rank < a.nnodes:
        parser.error(f"--node-rank must be in 1..{a.nnodes - 1} (node 0 runs the engine itself)")
    if a.tensor_parallel_size < a.nnodes or a.tensor_parallel_size % a.nnodes:
        parser.error(f"--tensor-parallel-size ({a.tensor_parallel_size}) must be a multiple of --nnodes ({a.nnodes})")
    if not a.master_addr or not a.master_port:
        parser.error("--master-addr and --master-port (or MASTER_ADDR / MASTER_PORT) are required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from fastserve.worker.model_runner import resolve_device

    try:
        device_type = resolve_device(a.device).type
    except ValueError as e:
        parser.error(str(e))
    per_node = a.tensor_parallel_size // a.nnodes
    if device_type == "cuda":
        import torch

        if per_node > torch.cuda.device_count():
            parser.error(
                f"--tensor-parallel-size {a.tensor_parallel_size} over {a.nnodes} nodes needs {per_node} "
                f"GPUs here, {torch.cuda.device_count()} are visible"
            )
    first = a.node_rank * per_node
    workers = spawn_workers(
        range(first, first + per_node),
        a.tensor_parallel_size,
        f"tcp://{a.master_addr}:{a.master_port}",
        device_type,
        per_node,
    )
    logger.info(
        "node %d: ranks %d..%d started (pids %s)", a.node_rank, first, first + per_node - 1, [p.pid for p, _ in workers]
    )
    code = 0
    try:
        conns = {c: p for p, c in workers}
        sentinels = {p.sentinel: p for p, _ in workers}
        while True:
            ready = mpc.wait([*conns, *sentinels])
            for r in ready:
                if r not in conns:
                    continue
                try:
                    msg = r.recv()
                except (EOFError, OSError):
                    del conns[r]
                    continue
                if isinstance(msg, WorkerFailed):
                    logger.error("rank %d stopped:\n%s", msg.rank, msg.traceback)
            # One rank gone ends the group (the driver closed it, died, or a rank failed).
            exited = [sentinels[r] for r in ready if r in sentinels]
            if exited:
                code = max(p.exitcode or 0 for p in exited)
                break
    except KeyboardInterrupt:
        code = 130
    finally:
        for proc, conn in workers:
            stop_process(proc, conn)
    return code


if __name__ == "__main__":
    sys.exit(main())
