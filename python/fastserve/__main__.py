"""`python -m fastserve --model PATH_OR_ID` (or `python -m fastserve ID`, or the `fastserve`
command): the OpenAI-compatible server; a hub ID resolves through model_resolver.py. Without
--model it serves a tiny random-weight demo checkpoint (output is noise)."""

from __future__ import annotations

import asyncio
import logging
import sys

logger = logging.getLogger("fastserve")


def main(argv: list[str] | None = None) -> int:
    from fastserve.server.cli import parse_args

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is None:
        from fastserve.demo import DEMO_MODEL_NAME, demo_checkpoint

        args.model = str(demo_checkpoint())
        args.served_model_name = args.served_model_name or [DEMO_MODEL_NAME]
        logger.warning("no --model given: serving the built-in demo checkpoint %s (random "
                       "weights: its output is noise; pass --model with a directory or hub ID for a real model)",
                       args.model)
    from fastserve.server.app import serve

    try:
        return asyncio.run(serve(args))
    except ValueError as e:  # bad flag values (EngineArgs, --chat-template) end here
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
