"""Online serving benchmark: `fastserve bench serve` (fastserve.benchmarks.serve) run from the
repository, with the same flags and JSON result (bench/results/serving-*.json):

    python bench/serving.py --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --request-rate 1 4 16 inf --input-len 512 --output-len 128 --result out.json

`python bench/serving.py --help` lists every flag (ShareGPT, --burstiness, --plot)."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import fastserve.benchmarks.serve  # noqa: F401 - installed, or python/ already on the path
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from fastserve.benchmarks.serve import main as _main  # noqa: E402
from fastserve.benchmarks.serve import make_parser  # noqa: E402


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return _main(args)
    except ValueError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
