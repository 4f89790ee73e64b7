"""Hub caches laid out as a finished download leaves them, filled from a local checkpoint, so
that model IDs resolve with the hub unreachable (tests never reach the network).

    snapshot = add_to_hf_cache(cache, "org/name", checkpoint_dir)             # HF_HUB_CACHE layout
    snapshot = add_to_modelscope_cache(cache, "org/name", checkpoint_dir)     # MODELSCOPE_CACHE layout

Hugging Face (huggingface_hub's cache, what `snapshot_download` writes):
    models--org--name/blobs/<etag>                  file contents; etag = sha256 for LFS files,
                                                    the git blob sha1 for the others
    models--org--name/refs/<revision>               the commit sha, no newline
    models--org--name/snapshots/<commit>/<file>     relative symlink to ../../blobs/<etag>
ModelScope (the `modelscope` package, 1.38+): models/org--name/snapshots/<revision>/<file>
(plain files); legacy=True: the pre-1.38 layout models/org/name (dots in the name as ___),
which the package still reads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# What the hub stores through LFS (its .gitattributes for model repos), or anything over 10 MB.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".gguf")


def _etag(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(_LFS_SUFFIXES) or len(data) > 10 * 1024 * 1024:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _files(src: Path, only: list[str] | None) -> list[Path]:
    names = only if only is not None else sorted(p.name for p in src.iterdir() if p.is_file())
    return [src / n for n in names]


def add_to_hf_cache(
    cache: str | os.PathLike,
    repo_id: str,
    src: str | os.PathLike,
    *,
    revision: str = "main",
    files: list[str] | None = None,
    commit: str | None = None,
) -> Path:
    """Put the files of `src` (or the named ones) into `cache` as revision `revision` of
    `repo_id` and return the snapshot directory. The commit sha derives from the contents
    unless given."""
    src = Path(src)
    storage = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    paths = _files(src, files)
    etags = {p.name: _etag(p) for p in paths}
    commit = commit or hashlib.sha1("".join(f"{n}:{e}\n" for n, e in sorted(etags.items())).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in paths:
        blob = storage / "blobs" / etags[p.name]
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snapshot / p.name
        if not link.is_symlink():
            link.symlink_to(os.path.join("..", "..", "blobs", etags[p.name]))
    if revision != commit:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / revision).write_text(commit)
    return snapshot


def add_to_modelscope_cache(
    cache: str | os.PathLike,
    repo_id: str,
    src: str | os.PathLike,
    *,
    revision: str = "master",
    files: list[str] | None = None,
    legacy: bool = False,
) -> Path:
    owner, name = repo_id.split("/", 1)
    if legacy:
        target = Path(cache) / "models" / owner / name.replace(".", "___")
    else:
        target = Path(cache) / "models" / f"{owner}--{name}" / "snapshots" / revision
    target.mkdir(parents=True, exist_ok=True)
    for p in _files(Path(src), files):
        shutil.copyfile(p, target / p.name)
    return target
