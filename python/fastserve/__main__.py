"""`python -m fastserve --model PATH` (or the `fastserve` command): the OpenAI-compatible
server. Without --model it serves a tiny random-weight demo checkpoint (output is noise).

Subcommands, as vLLM's CLI has them: `fastserve serve MODEL` (the server),
`fastserve bench {throughput,serve,latency} ...` (fastserve.benchmarks) and
`fastserve run-batch -i in.jsonl -o out.jsonl --model M` (fastserve.entrypoints.run_batch)."""

from __future__ import annotations

import asyncio
import logging
import sys

logger = logging.getLogger("fastserve")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from fastserve.benchmarks.cli import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "run-batch":
        from fastserve.entrypoints.run_batch import main as run_batch_main

        return run_batch_main(argv[1:])
    from fastserve.server.cli import parse_args

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is None:
        from fastserve.demo import DEMO_MODEL_NAME, demo_checkpoint

        args.model = str(demo_checkpoint())
        args.served_model_name = args.served_model_name or [DEMO_MODEL_NAME]
        logger.warning("no --model given: serving the built-in demo checkpoint %s (random "
                       "weights: its output is noise; pass --model PATH for a real model)",
                       args.model)
    from fastserve.server.app import serve

    try:
        return asyncio.run(serve(args))
    except ValueError as e:  # bad flag values (EngineArgs, --chat-template) end here
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
