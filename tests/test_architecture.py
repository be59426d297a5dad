"""The package layering: no import cycles between twinquant's subpackages or modules, and io/ below the stages.

Imports are read from the source (every `import` / `from … import`, at module level or inside functions), so a
function-level import that only hides a cycle counts as one; imports under `if TYPE_CHECKING:` are type hints,
not run, and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import twinquant

ROOT = Path(twinquant.__file__).parent
# io/ reads and writes the model representation and the formats; it must not know the stages that made a file
IO_MAY_IMPORT = {"errors", "model", "formats", "transforms", "io"}


def _module(path: Path) -> str:
    parts = ("twinquant",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node) -> bool:
    t = node.test
    return isinstance(t, ast.Name) and t.id == "TYPE_CHECKING" or isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    mod, out = _module(path), set()
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]

    def visit(node):
        if isinstance(node, ast.If) and _type_checking(node):
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("twinquant."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            if base.startswith("twinquant."):
                # `from pkg import mod` imports the module pkg.mod when there is one
                subs = [f"{base}.{a.name}" for a in node.names if _exists(f"{base}.{a.name}")]
                out.update(subs or [base])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _exists(mod: str) -> bool:
    p = ROOT.joinpath(*mod.split(".")[1:])
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph(level) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        a = level(_module(path))
        g.setdefault(a, set()).update(level(b) for b in _imports(path) if level(b) != a)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(g):
        if v not in index:
            visit(v)
    return out


def _subpackage(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def test_no_cycles_between_subpackages():
    assert _cycles(_graph(_subpackage)) == []


def test_no_cycles_between_modules():
    assert _cycles(_graph(lambda m: m)) == []


def test_io_depends_only_on_the_model_and_the_formats():
    bad = {m: sorted(b for b in _imports(p) if b.split(".")[1] not in IO_MAY_IMPORT)
           for p in (ROOT / "io").rglob("*.py") for m in [_module(p)]}
    assert {m: b for m, b in bad.items() if b} == {}


def test_the_checker_sees_a_function_level_cycle(tmp_path):
    # the checker itself can fail: a planted cycle through a function-level import is found
    g = {"twinquant.a": {"twinquant.b"}, "twinquant.b": {"twinquant.a"}, "twinquant.c": {"twinquant.a"}}
    assert _cycles(g) == [["twinquant.a", "twinquant.b"]]
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from twinquant.io import gguf_read\n")
    tree_imports = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            tree_imports.add(node.module)
    assert tree_imports == {"twinquant.io"}
