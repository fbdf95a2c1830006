"""Every path and dotted kvq name the README and docs/ mention resolves in the tree (nothing stale after a move)."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a path of the project: starts at one of its top-level folders
PATH = re.compile(r"(?<![\w./-])((?:kvq|bench|docs|recipes|tests|\.ci)/[\w./-]*\w)")
# a dotted name under kvq: module, then maybe an attribute (kvq.cli.main, kvq.quant.qparams.choose_qparams)
DOTTED = re.compile(r"(?<![\w.])(kvq(?:\.\w+)+)")
# other projects' files that docs/engines.md cites by path (TensorRT-LLM's docs/source, LMDeploy's docs/en)
UPSTREAM = ("docs/source/", "docs/en/")
# folders a bench script builds (git-ignored), named in the docs before they exist
BUILT = ("bench/device_model",)
LINK = re.compile(r"\]\(((?!https?:|#)[^)#\s]+)")


def _mentions(doc: Path) -> list[tuple[str, str]]:
    text = doc.read_text(encoding="utf-8")
    found = [("path", m) for m in PATH.findall(text) if not m.startswith(UPSTREAM) and m not in BUILT]
    found += [("name", m) for m in DOTTED.findall(text)]
    found += [("link", m) for m in LINK.findall(text)]
    return found


def _resolves(kind: str, ref: str, doc: Path) -> bool:
    if kind == "link":
        return (doc.parent / ref).exists()
    if kind == "path":
        return any(p.exists() for p in (ROOT / ref, ROOT / ref.rstrip("."), ROOT / "kvq" / ref))
    parts = ref.split(".")
    obj = importlib.import_module(parts[0])
    for n, attr in enumerate(parts[1:], start=2):  # a submodule where there is one, else an attribute
        if not hasattr(obj, attr) and hasattr(obj, "__path__"):
            module = ".".join(parts[:n])
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_and_name_in_the_docs_resolves(doc):
    stale = sorted({f"{kind} {ref}" for kind, ref in _mentions(doc) if not _resolves(kind, ref, doc)})
    assert not stale, f"{doc.name} mentions what the tree does not hold: {stale}"
