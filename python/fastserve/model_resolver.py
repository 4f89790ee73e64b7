"""Where a model's files are: a local directory as given, or a model ID (`org/name`) resolved
to a local snapshot of the Hugging Face hub (through `huggingface_hub`) or, with
VLLM_USE_MODELSCOPE=True (or FASTSERVE_USE_MODELSCOPE=True), of ModelScope (through the
`modelscope` package).

Only the files the engine reads are fetched: config.json, generation_config.json, the
tokenizer files, chat templates, quantization configs, the weight index and the weights
themselves (safetensors; PyTorch .bin only when the repository has no safetensors; none for
load_format="dummy"). A cached snapshot is used without network when the hub cannot be
reached or downloads are off (HF_HUB_OFFLINE=1). Environment variables are read at each call
(not when huggingface_hub is imported), so a script may set them just before LLM(...).

Every failure is one ValueError line that says where the model was looked for (local path,
cache directory, hub endpoint) and what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastserve.engine.arg_utils import EngineArgs

logger = logging.getLogger("fastserve")

# Small files the engine (or the tokenizer, or a quantized loader) may read; exact top-level names.
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "quantize_config.json",
    "quant_config.json",
    "hf_quant_config.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "config.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"
# The loader's own choice (worker/loader.py): safetensors, else pytorch_model*.bin.
_SAFETENSORS_PATTERN = "*.safetensors"
_PT_PATTERN = "pytorch_model*.bin"

_TRUE = ("1", "true", "yes", "on")
# A hub model ID: `name` or `org/name` (letters, digits, - _ .), as huggingface_hub validates.
_REPO_ID = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def use_modelscope() -> bool:
    """VLLM_USE_MODELSCOPE=True (vLLM's switch) or FASTSERVE_USE_MODELSCOPE=True."""
    return _env_true("VLLM_USE_MODELSCOPE") or _env_true("FASTSERVE_USE_MODELSCOPE")


def hf_offline() -> bool:
    """huggingface_hub's rule (HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE), read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def hf_cache_dir(download_dir: str | None = None) -> str:
    """The hub cache huggingface_hub would use: download_dir, else HF_HUB_CACHE, else
    HF_HOME/hub, else ~/.cache/huggingface/hub (XDG_CACHE_HOME honoured)."""
    if download_dir:
        return os.path.expanduser(download_dir)
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return os.path.expanduser(cache)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return os.path.join(os.path.expanduser(home), "hub")


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def modelscope_cache_dir(download_dir: str | None = None) -> str:
    """download_dir, else MODELSCOPE_CACHE, else ~/.cache/modelscope (the modelscope package's default)."""
    return os.path.expanduser(download_dir or os.environ.get("MODELSCOPE_CACHE") or "~/.cache/modelscope")


def modelscope_endpoint() -> str:
    value = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "https://www.modelscope.cn"
    return value if value.startswith(("http://", "https://")) else "https://" + value


def looks_like_model_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and "--" not in name and not name.startswith(".")


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:limit]}"


# -- which files -------------------------------------------------------------------------------


def _weight_files(listing: list[str], load_format: str) -> list[str] | None:
    """Top-level weight files of a repository listing that the loader would read (as
    worker/loader.py chooses them); None when an index json names them, to be read once the
    small files are fetched (_weights_from_index)."""
    top = [f for f in listing if "/" not in f]
    if load_format == "dummy":
        return []
    if load_format in ("auto", "safetensors"):
        if SAFETENSORS_INDEX in top:
            return None
        st = fnmatch.filter(top, _SAFETENSORS_PATTERN)
        if st or load_format == "safetensors":
            return st
    if PT_INDEX in top:
        return None
    return fnmatch.filter(top, _PT_PATTERN)


def _weights_from_index(snapshot: str, listing: list[str], load_format: str) -> list[str]:
    """The shards an index json names (so a consolidated copy beside them is not fetched)."""
    for index in (SAFETENSORS_INDEX,) if load_format == "safetensors" else (SAFETENSORS_INDEX, PT_INDEX):
        path = os.path.join(snapshot, index)
        if index in listing and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return sorted(set(json.load(f)["weight_map"].values()))
    return []


def _missing_weights(model_dir: str, load_format: str) -> str | None:
    """What a snapshot lacks for the loader, or None when its weights are all there."""
    if load_format == "dummy":
        return None
    for index, pattern, formats in (
        (SAFETENSORS_INDEX, _SAFETENSORS_PATTERN, ("auto", "safetensors")),
        (PT_INDEX, _PT_PATTERN, ("auto", "pt")),
    ):
        if load_format not in formats:
            continue
        index_path = os.path.join(model_dir, index)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
            return f"shards {missing[:3]} named by {index} are missing" if missing else None
        if glob.glob(os.path.join(model_dir, pattern)):
            return None
    return "it holds no weight files (*.safetensors or pytorch_model*.bin)"


# -- Hugging Face hub --------------------------------------------------------------------------


@contextlib.contextmanager
def _online(hub_constants):
    """huggingface_hub reads HF_HUB_OFFLINE once, when it is imported; fastserve reads it at each
    call (a script may change it before LLM(...)), so a resolution that decided to go online
    lifts the import-time value for its own hub calls."""
    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


class _NotResolved(Exception):
    """Why one source could not produce the snapshot (becomes part of the one-line error)."""


def _hf_snapshot(repo_id: str, revision: str | None, cache_dir: str, token, wanted, kind: str, probe: str) -> str:
    """A local snapshot of `repo_id` holding the files `wanted(listing, snapshot)` picks.

    Online: list the repository, fetch the small files, then what `wanted` adds (weights,
    chosen with the index json in hand). Offline or unreachable: the cached snapshot."""
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub import errors

    endpoint = hf_endpoint()
    reason = None
    if hf_offline():
        reason = "downloads are off (HF_HUB_OFFLINE=1)"
    else:
        with _online(huggingface_hub.constants):
            api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
            try:
                info = api.model_info(repo_id, revision=revision, token=token)
                listing = [s.rfilename for s in (info.siblings or [])]
            except errors.RevisionNotFoundError as e:
                raise _NotResolved(
                    f"the hub at {endpoint} has {repo_id!r} but no revision {revision!r} "
                    f"({_one_line(e, 120)}); pass an existing branch, tag or commit"
                ) from e
            except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
                raise _NotResolved(
                    f"the hub at {endpoint} refused {repo_id!r} ({_one_line(e, 160)}): check the ID; "
                    "for a gated or private model accept its license on the hub and log in "
                    "(`hf auth login`, HF_TOKEN or --hf-token)"
                ) from e
            except Exception as e:  # noqa: BLE001 - connection, DNS, proxy, 5xx: fall back to the cache
                reason = f"the hub at {endpoint} could not be reached ({_one_line(e, 160)})"
            else:
                small = [
                    f
                    for f in listing
                    if "/" not in f and f in set(CONFIG_FILES + TOKENIZER_FILES + (SAFETENSORS_INDEX, PT_INDEX))
                ]
                t0 = time.perf_counter()
                logger.info(
                    "downloading %s %s (revision %s) from %s into %s",
                    kind,
                    repo_id,
                    revision or "main",
                    endpoint,
                    cache_dir,
                )

                def fetch(files: list[str]) -> str:
                    try:
                        return huggingface_hub.snapshot_download(
                            repo_id,
                            revision=revision,
                            cache_dir=cache_dir,
                            token=token,
                            endpoint=endpoint,
                            allow_patterns=[glob.escape(f) for f in files],
                        )
                    except Exception as e:  # noqa: BLE001 - a dropped connection mid-download, a full disk
                        raise _NotResolved(
                            f"downloading from {endpoint} into {cache_dir} failed "
                            f"({_one_line(e, 200)}); running again resumes it"
                        ) from e

                snapshot = fetch(small)
                extra = wanted(listing, snapshot)
                if extra:
                    sizes = {s.rfilename: s.size for s in (info.siblings or []) if s.size is not None}
                    total = sum(sizes.get(f, 0) for f in extra)
                    logger.info("fetching %d weight file(s) of %s (%.2f GB)", len(extra), repo_id, total / 1e9)
                    snapshot = fetch(small + extra)
                logger.info("%s %s is at %s (%.1f s)", kind, repo_id, snapshot, time.perf_counter() - t0)
                return snapshot
    # The snapshot folder of `revision` (refs/<branch> -> commit), found through one file it must
    # hold. Not snapshot_download(local_files_only=True): huggingface_hub >= 1.x checks the
    # folder against the repository's whole listing, and fastserve downloads only part of it.
    cached = huggingface_hub.try_to_load_from_cache(repo_id, probe, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        return os.path.dirname(cached)
    raise _NotResolved(
        f"no snapshot of it with {probe} (revision {revision or 'main'}) is in the Hugging Face "
        f"cache {os.path.join(cache_dir, 'models--' + repo_id.replace('/', '--'))} and {reason}"
    )


# -- ModelScope --------------------------------------------------------------------------------


def _ms_snapshot(repo_id: str, revision: str | None, cache_dir: str, token, wanted, kind: str, probe: str) -> str:
    try:
        from modelscope import snapshot_download
        from modelscope.hub.api import HubApi
    except ImportError as e:
        raise _NotResolved(
            "VLLM_USE_MODELSCOPE is set but the `modelscope` package is not installed "
            "(pip install 'fastserve[modelscope]')"
        ) from e
    endpoint = modelscope_endpoint()
    reason = None
    if hf_offline():  # vLLM's switch for "no network" covers ModelScope too
        reason = "downloads are off (HF_HUB_OFFLINE=1)"
    else:
        try:
            api = HubApi()  # its token: MODELSCOPE_API_TOKEN or `modelscope login`
            entries = api.get_model_files(repo_id, revision=revision, recursive=False)
            listing = [e.get("Path") or e.get("Name") for e in entries if (e.get("Type") or "blob") != "tree"]
        except Exception as e:  # noqa: BLE001 - unreachable, unknown ID: look in the cache
            reason = f"ModelScope at {endpoint} answered with {_one_line(e, 160)}"
        else:
            small = [f for f in listing if f in set(CONFIG_FILES + TOKENIZER_FILES + (SAFETENSORS_INDEX, PT_INDEX))]
            t0 = time.perf_counter()
            logger.info(
                "downloading %s %s (revision %s) from %s into %s",
                kind,
                repo_id,
                revision or "master",
                endpoint,
                cache_dir,
            )

            def fetch(files: list[str]) -> str:
                try:
                    return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=files)
                except Exception as e:  # noqa: BLE001
                    raise _NotResolved(
                        f"downloading from {endpoint} into {cache_dir} failed "
                        f"({_one_line(e, 200)}); running again resumes it"
                    ) from e

            snapshot = fetch(small)
            extra = wanted(listing, snapshot)
            if extra:
                snapshot = fetch(small + extra)
            logger.info("%s %s is at %s (%.1f s)", kind, repo_id, snapshot, time.perf_counter() - t0)
            return snapshot
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - CacheNotFound and friends
        raise _NotResolved(
            f"no snapshot of it (revision {revision or 'master'}) is in the ModelScope cache "
            f"{os.path.join(cache_dir, 'models', repo_id.replace('/', '--'))} and {reason}"
        ) from e


# -- public ------------------------------------------------------------------------------------


def _resolve(name: str, what: str, *, revision, download_dir, token, wanted, required: tuple[str, ...]) -> str:
    if os.path.exists(name):
        return name
    modelscope = use_modelscope()
    hub = "ModelScope" if modelscope else "the Hugging Face hub"
    if not looks_like_model_id(name):
        raise ValueError(
            f"{what} {name!r} is neither a local directory (no such path: "
            f"{os.path.abspath(name)}) nor a model ID of {hub} (org/name): pass a directory with "
            "config.json and weights, or an ID like meta-llama/Llama-3.1-8B-Instruct"
        )
    cache = modelscope_cache_dir(download_dir) if modelscope else hf_cache_dir(download_dir)
    try:
        snapshot = (_ms_snapshot if modelscope else _hf_snapshot)(
            name, revision, cache, token, wanted, what, required[0]
        )
    except _NotResolved as e:
        if modelscope:
            todo = (
                "download it where ModelScope is reachable (`modelscope download --model ID`) and point "
                "MODELSCOPE_CACHE (or --download-dir) at that cache, or pass a local directory"
            )
        else:
            todo = (
                "download it where the hub is reachable (`hf download ID`) and point HF_HUB_CACHE (or "
                "HF_HOME, or --download-dir) at that cache, run with network access (HF_HUB_OFFLINE unset), "
                "or pass a local directory"
            )
        raise ValueError(
            f"{what} {name!r} could not be resolved: no local directory {os.path.abspath(name)}, {e}. To fix: {todo}"
        ) from e
    for fname in required:
        if not os.path.isfile(os.path.join(snapshot, fname)):
            raise ValueError(
                f"{what} {name!r}: the snapshot at {snapshot} has no {fname} (an interrupted or "
                "partial download?): run again with network access to complete it, or pass a "
                "local directory"
            )
    return snapshot


def resolve_model(
    model: str,
    *,
    revision: str | None = None,
    download_dir: str | None = None,
    load_format: str = "auto",
    token: str | bool | None = None,
) -> str:
    """A local directory holding `model`'s config, tokenizer files and weights (those
    load_format reads). A local path is returned as given."""

    def wanted(listing: list[str], snapshot: str) -> list[str]:
        files = _weight_files(listing, load_format)
        return _weights_from_index(snapshot, listing, load_format) if files is None else files

    path = _resolve(
        model,
        "model",
        revision=revision,
        download_dir=download_dir,
        token=token,
        wanted=wanted,
        required=("config.json",),
    )
    if path != model:  # a snapshot: say plainly when it cannot be loaded (a local dir gets the loader's error)
        missing = _missing_weights(path, load_format)
        if missing:
            raise ValueError(
                f"model {model!r}: the snapshot at {path} cannot be loaded with "
                f"load_format={load_format!r}: {missing}; run again with network access to "
                "complete the download, or pass a local directory"
            )
    return path


def resolve_tokenizer(
    tokenizer: str, *, revision: str | None = None, download_dir: str | None = None, token: str | bool | None = None
) -> str:
    """A local directory with `tokenizer`'s files (tokenizer.json, its config, the chat
    template); an ID fetches those files only."""
    return _resolve(
        tokenizer,
        "tokenizer",
        revision=revision,
        download_dir=download_dir,
        token=token,
        wanted=lambda listing, snapshot: [],
        required=("tokenizer.json",),
    )


def resolve_engine_args(args: EngineArgs) -> EngineArgs:
    """A copy of `args` whose model and tokenizer are local directories, and whose
    served_model_name defaults to the name the user gave (the ID, as vLLM reports it).
    tokenizer=None means the model's files; tokenizer_revision defaults to revision."""
    model_dir = resolve_model(
        args.model,
        revision=args.revision,
        download_dir=args.download_dir,
        load_format=args.load_format,
        token=args.hf_token,
    )
    if args.tokenizer is None or args.tokenizer == args.model:
        tokenizer_dir = model_dir
        if args.tokenizer_revision not in (None, args.revision):
            tokenizer_dir = resolve_tokenizer(
                args.model, revision=args.tokenizer_revision, download_dir=args.download_dir, token=args.hf_token
            )
    else:
        tokenizer_dir = resolve_tokenizer(
            args.tokenizer,
            revision=args.tokenizer_revision or args.revision,
            download_dir=args.download_dir,
            token=args.hf_token,
        )
    if args.trust_remote_code:
        check_remote_code(model_dir)
    if model_dir == args.model and tokenizer_dir == (args.tokenizer or args.model):
        return args
    return dataclasses.replace(
        args, model=model_dir, tokenizer=tokenizer_dir, served_model_name=args.served_model_name or [args.model]
    )


_remote_code_noted: set[tuple[str, ...]] = set()


def check_remote_code(model_dir: str) -> None:
    """trust_remote_code=True: fastserve never imports code from a checkpoint (auto_map and
    any *.py in it are ignored); it runs its own implementation of the architecture that
    config.json names, and fails, naming the supported ones, when it has none."""
    from fastserve.models.registry import supported_architectures

    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return  # no readable config.json: ModelConfig reports that with its own message
    archs = tuple(hf.get("architectures") or ())
    supported = supported_architectures()
    ours = [a for a in archs if a in supported]
    if not ours:
        raise ValueError(
            f"trust_remote_code=True: config.json of {model_dir} names architectures {list(archs)}, which "
            f"fastserve does not implement; fastserve never runs code shipped in a checkpoint, it runs its own "
            f"implementations of {supported}"
        )
    if archs not in _remote_code_noted:
        _remote_code_noted.add(archs)
        logger.warning(
            "trust_remote_code=True: fastserve runs its own %s implementation and never executes code "
            "from the checkpoint%s",
            ours[0],
            " (config.json's auto_map is ignored)" if hf.get("auto_map") else "",
        )
