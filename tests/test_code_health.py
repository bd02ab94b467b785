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


# who may import whom (any import statement anywhere in a file, lazy ones included): each package may use the
# ones listed, never a package above it. inference (using a trained model) is the only one that uses both phases.
MAY_IMPORT = {
    "covt": {"covt"},
    "shards": {"covt", "shards"},
    "precompute": {"covt", "shards", "precompute"},
    "trainer": {"covt", "shards", "trainer"},
    "inference": {"covt", "shards", "precompute", "trainer", "inference"},
}
COMMAND_LINE_FORWARDS = {"trainer/__main__.py": {"inference"}}  # python -m trainer generate|evaluate


def module_name(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.Module, known: set[str]) -> set[str]:
    """The modules of ``known`` a file imports; ``from package import module`` counts as the module."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return {m for m in found if m in known or m.split(".")[0] in MAY_IMPORT}


def import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    known = {module_name(path) for path in trees}
    return {module_name(path): imported_modules(tree, known) - {module_name(path)} for path, tree in trees.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself through imports, as one circle per strongly connected group."""
    circles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph.get(m, ()):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            group = []
            while not group or group[-1] != m:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1 or m in graph.get(m, ()):
                circles.append(sorted(group))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return circles


def forbidden_imports(trees: dict[str, ast.Module]) -> list[str]:
    found = []
    for path, tree in trees.items():
        package = Path(path).parts[0]
        allowed = MAY_IMPORT[package] | COMMAND_LINE_FORWARDS.get(path, set())
        found += [f"{path} imports {m}" for m in sorted(imported_modules(tree, set()))
                  if m.split(".")[0] not in allowed]
    return found


def test_packages_import_only_the_ones_below_them():
    """covt <- shards <- precompute, trainer <- inference: the phases never import each other, not even lazily."""
    bad = forbidden_imports(modules(tuple(MAY_IMPORT)))
    assert not bad, f"move the code to the package both may use (covt, shards) or up into inference: {bad}"


def test_only_inference_imports_both_phases():
    trees = modules(tuple(MAY_IMPORT))
    both = sorted({Path(path).parts[0] for path, tree in trees.items()
                   for m in imported_modules(tree, set()) if m.split(".")[0] == "precompute"}
                  & {Path(path).parts[0] for path, tree in trees.items()
                     for m in imported_modules(tree, set()) if m.split(".")[0] == "trainer"})
    assert both == ["inference"]


def test_no_import_circle_among_modules():
    circles = import_circles(import_graph(modules(EVERYTHING)))
    assert not circles, f"these modules import each other (directly or through others): {circles}"


def test_the_import_rules_find_what_they_look_for():
    trees = {"trainer/a.py": ast.parse("def f():\n    from precompute.run import precompute\n"),
             "trainer/b.py": ast.parse("from trainer import c\n"),
             "trainer/c.py": ast.parse("import trainer.b\n"),
             "shards/d.py": ast.parse("from covt.fs import atomic_write\n")}
    assert forbidden_imports(trees) == ["trainer/a.py imports precompute.run"]
    assert import_circles(import_graph(trees)) == [["trainer.b", "trainer.c"]]


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
