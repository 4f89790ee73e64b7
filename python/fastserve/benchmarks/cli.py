"""`fastserve bench SUBCOMMAND`: the argument parsers of the benchmark commands and their
dispatch. Bad flag values end as one error line and exit code 2, not a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

SUBCOMMANDS = {
    "throughput": ("fastserve.benchmarks.throughput", "Offline throughput (vLLM's benchmark_throughput.py)."),
    "serve": ("fastserve.benchmarks.serve", "Online serving latency and throughput against a running server."),
    "latency": ("fastserve.benchmarks.latency", "One engine step's latency for a sweep of batch sizes."),
}


def make_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="fastserve bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="bench", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True)
    for name, (module, help_) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name, help=help_, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod.add_cli_args(p)
        p.add_argument(
            "--log-level",
            default="info",
            choices=["debug", "info", "warning", "error"],
            help="Log level of fastserve's messages.",
        )
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args._main(args) or 0
    except ValueError as e:
        logging.getLogger("fastserve").error("%s", e)
        return 2
