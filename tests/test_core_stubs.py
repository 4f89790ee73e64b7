"""`fastserve/_core.pyi` matches the compiled module exactly: mypy's stubtest compares every
class, method, property, signature and default the Rust extension exports with the stub, so
a pymethod added, renamed or re-signed in Rust without its stub fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy.stubtest", reason="mypy is in the test extra: pip install '.[test]'")

import fastserve  # noqa: E402
from fastserve import _core  # noqa: E402


def run_stubtest(site: Path, cache: Path) -> subprocess.CompletedProcess:
    # mypy's cache goes to a temporary directory, not beside the package it checks.
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "MYPYPATH": str(site),
        "MYPY_FORCE_COLOR": "0",
        "MYPY_CACHE_DIR": str(cache),
    }
    return subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastserve._core", "--mypy-config-file", os.devnull],
        cwd=cache.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def copy_package(dst_site: Path, stub: str | None = None) -> Path:
    # The compiled module and the stub beside the module this process imported (python/ in a
    # checkout, site-packages for an installed wheel: the pair that ships together), copied to a
    # directory of their own: mypy refuses site-packages in MYPYPATH.
    pkg = Path(fastserve.__file__).resolve().parent
    dst = dst_site / "fastserve"
    dst.mkdir(parents=True)
    for name in ("__init__.py", "errors.py", Path(_core.__file__).name):
        (dst / name).write_bytes((pkg / name).read_bytes())
    (dst / "_core.pyi").write_text(stub if stub is not None else (pkg / "_core.pyi").read_text())
    return dst_site


def test_stub_matches_the_compiled_module(tmp_path):
    assert (Path(fastserve.__file__).resolve().parent / "_core.pyi").is_file()
    r = run_stubtest(copy_package(tmp_path / "site"), tmp_path / "cache")
    assert r.returncode == 0, (
        "fastserve/_core.pyi has drifted from the Rust module; update the stub to what stubtest "
        f"reports:\n{r.stdout}\n{r.stderr}"
    )


def test_stubtest_catches_a_drift(tmp_path):
    # The same check against a copy whose stub lacks one Scheduler method must fail, naming it:
    # the check above cannot pass by checking nothing.
    stub = (Path(fastserve.__file__).resolve().parent / "_core.pyi").read_text()
    line = "    def discard_pending(self) -> bool:\n"
    assert line in stub
    site = copy_package(tmp_path / "site", stub.replace(line, "    def _was_discard_pending(self) -> bool:\n"))
    r = run_stubtest(site, tmp_path / "cache")
    assert r.returncode != 0
    assert "Scheduler.discard_pending is not present in stub" in r.stdout, r.stdout
