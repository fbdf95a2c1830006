"""The layout rules of kvq/ (README "Layout"), checked on the tree: a package per stage, one name per job."""

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvq"
MODULES = sorted(PACKAGE.rglob("*.py"))
# the same job under one name: each exporter's build(request) -> plan, called through the format table
SAME_JOB = {"build"}


def test_few_loose_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 6, loose


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_module_names_are_unique():
    seen = collections.defaultdict(list)
    for p in MODULES:
        if p.name != "__init__.py":
            seen[p.name].append(str(p.relative_to(PACKAGE)))
    assert not {k: v for k, v in seen.items() if len(v) > 1}


def test_public_functions_and_classes_are_named_once():
    seen = collections.defaultdict(list)
    for p in MODULES:
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                seen[node.name].append(str(p.relative_to(PACKAGE)))
    assert not {k: v for k, v in seen.items() if len(v) > 1 and k not in SAME_JOB}


def test_no_module_imports_kvq_by_a_string_name():
    for p in MODULES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in {"import_module", "__import__"}:
                raise AssertionError(f"{p.relative_to(PACKAGE)}:{node.lineno} imports by a string name")
