"""Rules of ../shared/STYLE.md checked on the tree itself, so they stay true as the code grows."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("covt", "shards", "precompute", "trainer", "inference")
EVERYTHING = (*LIBRARY, "bench", "tests")
MAX_FUNCTION_LINES = 60


def modules(folders: tuple[str, ...]) -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(), filename=str(p))
            for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_names(tree: ast.Module) -> set[str]:
    """Every name a file defines: functions, classes, variables and attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def long_functions(path: str, tree: ast.Module) -> list[str]:
    return [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def private_reaches(path: str, tree: ast.Module) -> list[str]:
    """``from m import _x``, and ``obj._x`` where ``_x`` is not this file's own name."""
    own = defined_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += [f"{path}:{node.lineno} from {node.module} import {a.name}"
                      for a in node.names if is_private(a.name)]
        elif isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in own:
            found.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_library_function_is_longer_than_60_lines():
    too_long = [line for path, tree in modules(LIBRARY).items() for line in long_functions(path, tree)]
    assert not too_long, f"split these into named pieces of at most {MAX_FUNCTION_LINES} lines: {too_long}"


def test_no_module_reaches_into_another_modules_private_names():
    reaches = [line for path, tree in modules(EVERYTHING).items() for line in private_reaches(path, tree)]
    assert not reaches, f"give these a public name in their module, or keep them inside it: {reaches}"


def test_the_checks_find_what_they_look_for():
    tree = ast.parse("from a import _hidden\n\ndef f(x):\n    return x._inner\n" + "\n" * 70 + "    pass\n")
    assert len(private_reaches("t.py", tree)) == 2
    assert long_functions("t.py", tree) == ["t.py:3 f (73 lines)"]
    own = ast.parse("class C:\n    def __init__(self):\n        self._n = 1\n\ndef g(c):\n    return c._n\n")
    assert private_reaches("t.py", own) == []
