"""The top-level `kernels/` is a view of the shipped package (python/fastserve/kernels), one
symlink per module, and deliberately not a Python package: with an `__init__.py` it would shadow
Hugging Face's PyPI package `kernels` (which transformers >= 5.2x imports) for anything run from
the repository root, and every transformers model import there failed."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_mirror_the_package_without_shadowing():
    top, pkg = ROOT / "kernels", ROOT / "python" / "fastserve" / "kernels"
    assert not (top / "__init__.py").exists(), "kernels/__init__.py would shadow the PyPI package `kernels`"
    want = {p.name for p in pkg.glob("*.py") if p.name != "__init__.py"}
    have = {p.name for p in top.iterdir()}
    assert have == want, f"kernels/ lacks {sorted(want - have)}, has extra {sorted(have - want)}"
    for name in want:
        link = top / name
        assert link.is_symlink() and link.resolve() == (pkg / name).resolve(), name
