"""The layout rules docs/layout.md states, checked on the code: no import circle, errors.py a leaf, no sibling
import inside a function, and a launcher that loads neither torch nor the training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "clip_train"
LAUNCHER_MAY_IMPORT = {"clip_train.errors", "clip_train.device.families", "clip_train.checkpoint.layout"}


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(clip_train module imported, at module level?) for every import of ours in the file."""
    tree, found = ast.parse(path.read_text(encoding="utf-8")), []
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clip_train"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            targets = [
                n if n in MODULES else node.module for n in names
            ]  # `from pkg import module` or a name
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("clip_train")]
        else:
            continue
        found += [(t, id(node) in top or _under_type_checking(tree, node)) for t in targets]
    return found


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test) and node in ast.walk(n)
        for n in tree.body
    )


def test_no_sibling_import_inside_a_function():
    late = {name: [t for t, top in _imports(path) if not top] for name, path in MODULES.items()}
    assert not {k: v for k, v in late.items() if v}, f"clip_train imports inside functions: {late}"


def test_errors_is_a_leaf():
    assert _imports(MODULES["clip_train.errors"]) == []


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph (module -> modules it imports), or None."""
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> list[str] | None:
        if name in trail:
            return trail[trail.index(name) :] + [name]
        if name in done:
            return None
        for dep in sorted(graph.get(name, ())):
            if found := visit(dep, trail + [name]):
                return found
        done.add(name)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_no_import_circle():
    graph = {
        name: {t for t, _ in _imports(path) if t in MODULES and t != name} for name, path in MODULES.items()
    }
    assert _circle(graph) is None, "import circle: " + " -> ".join(_circle(graph) or [])


def test_the_checks_catch_a_circle_and_a_late_import(tmp_path):
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None
    module = tmp_path / "m.py"
    module.write_text(
        "from clip_train.errors import DataError\n\ndef f():\n    from clip_train import model\n"
    )
    assert _imports(module) == [("clip_train.errors", True), ("clip_train.model", False)]


def test_the_launcher_loads_no_torch_and_no_training_code():
    launch = [n for n in MODULES if n.startswith("clip_train.launch.") and not n.endswith("__main__")]
    code = f"import sys\nfor m in {launch!r}: __import__(m)\nprint(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    modules = loaded.stdout.split()
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "transformers", "datasets", "accelerate")]
    ours = {
        m
        for m in modules
        if m.startswith("clip_train.") and m in MODULES and not m.startswith("clip_train.launch")
    }
    ours -= {m for m in ours if MODULES[m].name == "__init__.py"}
    assert not heavy, f"importing the launcher loads {heavy[:5]}"
    assert ours <= LAUNCHER_MAY_IMPORT, (
        f"the launcher imports training code: {sorted(ours - LAUNCHER_MAY_IMPORT)}"
    )
