"""Default sampling parameters from the checkpoint's `generation_config.json`, applied the way
vLLM applies them (`ModelConfig.get_diff_sampling_param`):

- `--generation-config auto` (the default) reads `generation_config.json` beside the model;
  `--generation-config vllm` reads nothing (the neutral SamplingParams defaults); any other
  value is a directory holding a `generation_config.json` to read instead.
- Of that file only the sampling fields vLLM takes are used: `temperature`, `top_p`, `top_k`,
  `min_p`, `repetition_penalty`, and `max_new_tokens` (HF's name for `max_tokens`).
  `--override-generation-config '{"temperature": 0.5}'` is laid over them.
- Precedence: a field the request sets > the generation config > SamplingParams' default.
  The server applies them to every request field left unset; `max_tokens` from the config is
  a cap (vLLM takes the smallest of the request's, the context's and the config's). The
  offline `LLM` applies them when `sampling_params` is None (`LLM.get_default_sampling_params()`),
  as vLLM's `LLM.generate` does.

vLLM reads the file through transformers' `GenerationConfig.to_diff_dict()`; with
transformers 5 every default there is None, so every field the file sets is a difference,
which is what is read here (without importing transformers, a test-only dependency).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

logger = logging.getLogger("fastserve")

# generation_config.json field -> SamplingParams field
FIELDS = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}
_INT_FIELDS = ("top_k", "max_tokens")


def _config_path(model: str, generation_config: str) -> tuple[str | None, bool]:
    """(path of the file to read or None, whether its absence is an error)."""
    if generation_config == "vllm":
        return None, False
    if generation_config == "auto":
        return os.path.join(model, "generation_config.json"), False
    return os.path.join(generation_config, "generation_config.json"), True


def load_generation_defaults(
    model: str, generation_config: str = "auto", override: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The SamplingParams fields (by their SamplingParams names) that the generation config
    sets; empty when it sets none or `generation_config == "vllm"`. ValueError names the
    file and field when a value cannot be a sampling parameter."""
    if not isinstance(generation_config, str) or not generation_config:
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a directory, got {generation_config!r}")
    path, required = _config_path(model, generation_config)
    raw: dict[str, Any] = {}
    if path is not None:
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    raw = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"cannot read {path}: {e}; fix the file or pass --generation-config vllm to ignore it"
                ) from None
            if not isinstance(raw, dict):
                raise ValueError(f"{path} must hold a JSON object; pass --generation-config vllm to ignore it")
        elif required:
            raise ValueError(f"--generation-config {generation_config!r}: no generation_config.json in that directory")
    if override:
        if not isinstance(override, dict):
            raise ValueError(f"override_generation_config must be a JSON object, got {override!r}")
        raw = {**raw, **override}
        path = f"{path or 'defaults'} + override_generation_config"
    out: dict[str, Any] = {}
    for src, dst in FIELDS.items():
        value = raw.get(src)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"{path}: {src} must be a number, got {value!r}; fix it or pass "
                "--generation-config vllm to ignore the file"
            )
        if dst in _INT_FIELDS:
            if float(value) != int(value):
                raise ValueError(f"{path}: {src} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        out[dst] = value
    if out:
        from fastserve.sampling_params import SamplingParams

        try:
            SamplingParams.from_optional(**out)
        except ValueError as e:
            raise ValueError(
                f"{path} sets an invalid sampling default: {e} Fix the file or "
                "pass --generation-config vllm to ignore it"
            ) from None
    return out


def log_generation_defaults(defaults: dict[str, Any], model: str, generation_config: str) -> None:
    if defaults:
        where = "generation_config.json" if generation_config == "auto" else generation_config
        logger.info(
            "default sampling parameters from the model's %s: %s (requests that leave "
            "these fields unset get them; --generation-config vllm turns this off)",
            where,
            ", ".join(f"{k}={v}" for k, v in sorted(defaults.items())),
        )
    else:
        logger.info(
            "default sampling parameters: SamplingParams' own (%s)",
            "--generation-config vllm"
            if generation_config == "vllm"
            else "the generation config sets no sampling field",
        )


def generation_defaults_for(engine_args) -> dict[str, Any]:
    """The defaults for an EngineArgs (its model, generation_config, override), logged."""
    mode = getattr(engine_args, "generation_config", "auto") or "auto"
    defaults = load_generation_defaults(
        engine_args.model, mode, getattr(engine_args, "override_generation_config", None)
    )
    log_generation_defaults(defaults, engine_args.model, mode)
    return defaults


def apply_to_request(kw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments from a request (`kw` holds only the fields the client
    set, plus max_tokens) with the defaults filled in; max_tokens is capped by the
    config's."""
    if not defaults:
        return kw
    out = dict(kw)
    for name, value in defaults.items():
        if name == "max_tokens":
            if out.get("max_tokens") is None or out["max_tokens"] > value:
                out["max_tokens"] = value
        elif out.get(name) is None:
            out[name] = value
    return out
