"""The modeling code of ``svqmae export-hf --with-code`` folders, generated from svqmae's own source.

A ``--with-code`` folder loads with ``trust_remote_code=True`` where svqmae is not installed. Its
Python files are written at export time from the source files of the installed svqmae package (never
from a hand-kept copy), with their imports rewritten for a flat folder of modules:

* the three modules transformers loads by name: :mod:`.configuration` -> ``configuration_svqmae.py``,
  :mod:`.modeling` -> ``modeling_svqmae.py``, :mod:`.feature_extraction` -> ``feature_extraction_svqmae.py``;
* every svqmae module they import at module level, transitively (``svqmae.model`` ->
  ``svqmae_model.py``, ``svqmae.config`` -> ``svqmae_config.py``, ...), with ``from .x import y`` /
  ``from svqmae.x import y`` rewritten to the folder's file names;
* lhotse's filterbank replaced by :class:`svqmae.tasks.hf.fbank.KaldiLogFilterBank` (``SUBSTITUTES``):
  the folder needs torch and transformers only (numpy, pyyaml and safetensors come with transformers);
* an import of another svqmae module inside a function (svqmae's own save/load helpers, say) becomes
  ``raise ImportError(...)``: those functions need svqmae, and nothing in the folder calls them.

Generation fails loudly (``RemoteCodeError``) if a shipped module imports a package outside
``ALLOWED`` + the standard library, or an import has a form this rewriter does not handle, and the
result is checked: every file compiles, and transformers' own scan of relative imports (which decides
which files it copies into its module cache) reaches every file that is imported.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = __package__  # svqmae.tasks.hf
ROOT = PACKAGE.split(".")[0]  # svqmae
ENTRY = {
    f"{PACKAGE}.configuration": "configuration_svqmae",
    f"{PACKAGE}.modeling": "modeling_svqmae",
    f"{PACKAGE}.feature_extraction": "feature_extraction_svqmae",
}
# (module, name) imported by svqmae -> (svqmae module, name) the generated code imports instead
SUBSTITUTES = {("lhotse.features.kaldi.layers", "Wav2LogFilterBank"): (f"{PACKAGE}.fbank", "KaldiLogFilterBank")}
# third-party packages the generated code may import: transformers and its own dependencies
ALLOWED = {"torch", "transformers", "numpy", "yaml", "safetensors"}
AUTO_MAP = {
    "AutoConfig": "configuration_svqmae.SVQMAEConfig",
    "AutoModel": "modeling_svqmae.SVQMAEModel",
    "AutoModelForCTC": "modeling_svqmae.SVQMAEForCTC",
}
FEATURE_EXTRACTOR_AUTO_MAP = {"AutoFeatureExtractor": "feature_extraction_svqmae.SVQMAEFeatureExtractor"}


class RemoteCodeError(RuntimeError):
    """svqmae's source cannot be turned into self-contained remote code; the message says where and why."""


def file_stem(module: str, entry: dict[str, str] = ENTRY) -> str:
    """svqmae module name -> the file (without .py) it becomes in the folder."""
    return entry.get(module) or "_".join(module.split("."))


@dataclass
class _Import:
    """One import statement of a shipped module and what it refers to."""

    node: ast.Import | ast.ImportFrom
    function: str | None  # the enclosing function's name, None at module level
    # (bound name, svqmae module, attribute or None for the module itself)
    bindings: list[tuple[str, str, str | None]] = field(default_factory=list)
    third_party: str | None = None  # top-level package of a non-svqmae import


def _is_own(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _is_submodule(package: str, name: str) -> bool:
    mod = importlib.import_module(package)
    if isinstance(getattr(mod, name, None), types.ModuleType):
        return True
    return hasattr(mod, "__path__") and importlib.util.find_spec(f"{package}.{name}") is not None


def _scan(module: types.ModuleType, tree: ast.Module, roots: tuple[str, ...]) -> list[_Import]:
    """Every import statement of ``module`` with its targets resolved to absolute module names."""
    found: list[_Import] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, function or child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(_resolve(module, child, function, roots))
            else:
                visit(child, function)

    visit(tree, None)
    return found


def _resolve(module: types.ModuleType, node: ast.Import | ast.ImportFrom, function: str | None,
             roots: tuple[str, ...]) -> _Import:
    imp = _Import(node, function)
    where = f"{module.__name__} line {node.lineno}"
    if isinstance(node, ast.Import):
        for alias in node.names:
            if not _is_own(alias.name, roots):
                imp.third_party = alias.name.split(".")[0]
            elif alias.asname is None or len(node.names) > 1:
                raise RemoteCodeError(f"{where}: `import {alias.name}` (use `import {alias.name} as x` or from-imports)")
            else:
                imp.bindings.append((alias.asname, alias.name, None))
        return imp
    if node.level:
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__)
    else:
        base = node.module or ""
    for alias in node.names:
        bound = alias.asname or alias.name
        if (base, alias.name) in SUBSTITUTES:
            target, name = SUBSTITUTES[(base, alias.name)]
            imp.bindings.append((bound, target, name))
        elif not _is_own(base, roots):
            imp.third_party = base.split(".")[0]
        elif alias.name == "*":
            raise RemoteCodeError(f"{where}: star imports are not supported")
        elif _is_submodule(base, alias.name):
            imp.bindings.append((bound, f"{base}.{alias.name}", None))
        else:
            imp.bindings.append((bound, base, alias.name))
    if imp.bindings and imp.third_party:
        raise RemoteCodeError(f"{where}: an import mixing substituted and kept names")
    return imp


def _statement(imp: _Import, shipped: set[str], entry: dict[str, str]) -> str:
    """The rewritten import (or the ``raise`` replacing it), without indentation."""
    if any(target not in shipped for _, target, _ in imp.bindings):
        if imp.function is None:
            raise RemoteCodeError(f"{imp.bindings}: not shipped although imported at module level")  # cannot happen
        return (f"raise ImportError(\"{imp.function}() needs the svqmae package (pip install svqmae); "
                "this model folder holds only what transformers needs\")")
    lines, names = [], {}
    for bound, target, name in imp.bindings:
        stem = file_stem(target, entry)
        if name is None:
            # transformers decides which files to copy by scanning for `from .x import`: name the file so
            lines.append(f"from .{stem} import __name__ as _{stem}_module_name  # noqa: F401 (for transformers)")
            lines.append(f"from . import {stem} as {bound}")
        else:
            names.setdefault(stem, []).append(name + (f" as {bound}" if bound != name else ""))
    lines += [f"from .{stem} import {', '.join(items)}" for stem, items in names.items()]
    return "\n".join(lines)


def _rewrite(module: types.ModuleType, source: str, imports: list[_Import], shipped: set[str],
             entry: dict[str, str]) -> str:
    lines = source.splitlines(keepends=True)
    for imp in sorted(imports, key=lambda i: -i.node.lineno):
        if not imp.bindings:
            continue
        n = imp.node
        first, last = lines[n.lineno - 1], lines[n.end_lineno - 1]
        if first[:n.col_offset].strip() or last[n.end_col_offset:].strip().split("#")[0].strip():
            raise RemoteCodeError(f"{module.__name__} line {n.lineno}: an import sharing its line with other code")
        indent = first[:n.col_offset]
        new = "".join(f"{indent}{line}\n" for line in _statement(imp, shipped, entry).splitlines())
        lines[n.lineno - 1:n.end_lineno] = [new]
    return "".join(lines)


def _header(module: types.ModuleType) -> str:
    top = module.__name__.split(".")[0]
    __version__ = getattr(sys.modules[top], "__version__", "?")
    rel = Path(module.__file__).relative_to(Path(sys.modules[top].__file__).parent).as_posix()
    return (f"# Generated by `svqmae export-hf --with-code` (svqmae {__version__}) from {top}/{rel}: the package's\n"
            "# own source, imports rewritten for this folder. Do not edit; export again instead.\n")


def generate(entry: dict[str, str] = ENTRY, roots: tuple[str, ...] = (ROOT,)) -> dict[str, str]:
    """File name -> Python source, for every module the folder needs. ``entry``: the modules to start from
    and their file names; ``roots``: the packages whose modules are shipped (their imports rewritten)."""
    todo, sources, scans = list(entry), {}, {}
    while todo:
        name = todo.pop(0)
        if name in sources:
            continue
        module = importlib.import_module(name)
        sources[name] = Path(module.__file__).read_text(encoding="utf-8")
        scans[name] = _scan(module, ast.parse(sources[name]), roots)
        for imp in scans[name]:
            if imp.third_party and imp.third_party not in ALLOWED and imp.third_party not in sys.stdlib_module_names:
                raise RemoteCodeError(
                    f"{name} line {imp.node.lineno} imports {imp.third_party}, which a --with-code folder cannot "
                    f"require (allowed: {', '.join(sorted(ALLOWED))}); add a substitute to {__name__}.SUBSTITUTES")
            if imp.function is None:
                todo += [target for _, target, _ in imp.bindings]
    shipped = set(sources)
    files = {}
    for name in sources:
        module = sys.modules[name]
        text = _header(module) + _rewrite(module, sources[name], scans[name], shipped, entry)
        try:
            compile(text, f"{file_stem(name, entry)}.py", "exec")
        except SyntaxError as e:
            raise RemoteCodeError(f"{name}: the rewritten source does not compile ({e})") from None
        files[f"{file_stem(name, entry)}.py"] = text
    _check_transformers_closure(files, entry)
    return files


_RELATIVE = re.compile(r"^\s*from\s+\.(\S+)\s+import", flags=re.MULTILINE)  # transformers' scan


def _check_transformers_closure(files: dict[str, str], entry: dict[str, str]) -> None:
    """transformers copies an entry file and, recursively, the files its relative-import scan finds.
    Every file any generated module imports must be among them."""
    reached, todo = set(), [f"{stem}.py" for stem in entry.values()]
    while todo:
        f = todo.pop()
        if f in reached:
            continue
        if f not in files:
            raise RemoteCodeError(f"generated code imports .{f[:-3]}, which is not generated")
        reached.add(f)
        todo += [f"{m}.py" for m in _RELATIVE.findall(files[f])]
    for f, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                names = [node.module] if node.module else [a.name for a in node.names]
                missing = [m for m in names if f"{m}.py" not in reached]
                if missing:
                    raise RemoteCodeError(f"{f}: imports {missing}, which transformers would not copy")
