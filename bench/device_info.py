"""What a benchmark ran on, and the two ceilings its numbers are judged against: a re-export
of `fastserve.benchmarks.device` (installed with the package, so `fastserve bench throughput`
reports the same numbers) for the scripts in bench/. Import it from another bench script
either way:

    from bench.device_info import device_info          # repo root on sys.path
    sys.path.insert(0, str(Path(__file__).parent)); from device_info import device_info

`python bench/device_info.py` prints the dict as JSON (`--no-measure`: no timing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:
    import fastserve.benchmarks.device  # noqa: F401 - installed, or python/ already on the path
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from fastserve.benchmarks.device import (  # noqa: E402,F401
    describe,
    device_info,
    git_commit,
    measure_copy_bandwidth_gbps,
    measure_matmul_tflops,
    time_cuda,
)

if __name__ == "__main__":
    json.dump(device_info(measure="--no-measure" not in sys.argv), sys.stdout, indent=2)
    print()
