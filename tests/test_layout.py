"""The package's layout is its architecture: imports point down only, and nothing imports in a circle.

    cli, api (top)  ->  tasks  ->  engine  ->  {model, data}  ->  config

``model`` and ``data`` import only ``config`` (and themselves); ``engine`` adds ``model`` and ``data``;
``tasks`` may import every room below it. The top level (``svqmae/__init__``, ``api``, ``cli`` and the
import-path shims) may import anything. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

import svqmae

PACKAGE = Path(svqmae.__file__).parent

ALLOWED = {  # room -> rooms it may import (besides itself)
    "config": set(),
    "model": {"config"},
    "data": {"config"},
    "engine": {"config", "model", "data"},
    "tasks": {"config", "model", "data", "engine"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """(imported svqmae module, line) for every import statement of the file, relative ones resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == root.name]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != root.name:
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                found.append((sub if sub in modules else target, node.lineno))
    return found


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    return parts[1] if parts[1] in ALLOWED else "top"


def violations(root: Path) -> list[str]:
    """Every import that breaks the rules, and every circle, as readable arrows."""
    bad, graph = [], {}
    for path in sorted(root.rglob("*.py")):
        src = module_name(path, root)
        graph[src] = set()
        for target, line in imports(path, root):
            graph[src].add(target)
            a, b = room(src), room(target)
            if a == "top" or a == b:
                continue
            if b == "top" or b not in ALLOWED[a]:
                may = ", ".join(sorted(ALLOWED[a])) or "nothing of svqmae"
                bad.append(f"{path.relative_to(root.parent)}:{line}: {src} -> {target} ({a} may import {may})")
    # circles: depth-first search over module -> module edges
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                bad.append("circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return bad


def test_imports_point_down_only_and_never_in_a_circle():
    problems = violations(PACKAGE)
    assert not problems, "import rules broken:\n" + "\n".join(problems)


@pytest.mark.parametrize("where, line, expect", [
    ("model/svqmae.py", "from ..data import load_source", "svqmae.model.svqmae -> svqmae.data"),
    ("data/loader.py", "from ..model.masking import padding_mask", "svqmae.data.loader -> svqmae.model.masking"),
    ("engine/progress.py", "    from ..tasks import pretrain", "svqmae.engine.progress -> svqmae.tasks.pretrain"),
    ("config.py", "import svqmae.api", "svqmae.config -> svqmae.api"),
    ("model/masking.py", "from .svqmae import SVQMAE", "circle: "),
])
def test_a_forbidden_import_is_found_and_named(tmp_path, where, line, expect):
    root = tmp_path / "svqmae"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    target = root / where
    text = target.read_text()
    if line.startswith("    "):  # inside a function: also counts
        text += f"\n\ndef _late():\n{line}\n"
    else:
        text = text.replace("from __future__ import annotations\n", f"from __future__ import annotations\n\n{line}\n", 1)
    target.write_text(text)
    problems = violations(root)
    assert any(expect in p for p in problems), problems
