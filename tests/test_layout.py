"""The package's shape: no import cycle anywhere, ``import fastclip`` stays light, every op has the same layout."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fastclip"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, modules: dict):
    """The fastclip Python module an import of ``name`` names, or None (another package, or the compiled
    extension ``fastclip._C``). Parent packages that Python initializes on the way are not counted as edges."""
    return name if name in modules else None


def import_graph() -> dict:
    """module -> the fastclip modules it imports, at any depth of its code (functions included)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    pkg = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                # "from pkg import sub" imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                dep = _resolve(t, modules)
                if dep and dep != name:
                    edges.add(dep)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None (iterative DFS, white/grey/black colouring)."""
    colour = {n: 0 for n in graph}
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt, 2) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt, 2) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "fastclip.dispatch" in graph and "fastclip.ops.contrastive" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    # the check above can fail: the same walker on a graph with a cycle reports it
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_op_has_the_same_shape():
    ops = sorted(p.name for p in (PKG / "ops").iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert {"contrastive", "siglip", "attention"} <= set(ops)
    allowed = {"__init__.py", "reference.py", "pytorch.py", "triton.py", "cuda.py"}
    for op in ops:
        files = {p.name for p in (PKG / "ops" / op).glob("*.py")}
        assert {"__init__.py", "reference.py"} <= files, (op, files)
        extra = files - allowed
        # helper modules of one op are private (a leading underscore); no other public module per op
        assert all(f.startswith("_") for f in extra), (op, extra)


def test_import_fastclip_is_light():
    code = ("import sys, fastclip; heavy = [m for m in sys.modules if m == 'triton' or m.startswith('triton.') "
            "or m.startswith('fastclip.models') or m in ('fastclip.tokenizer', 'fastclip.transforms', 'PIL')]; "
            "print(heavy); assert not heavy, heavy")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["contrastive_loss", "siglip_loss", "flash_attention"])
def test_functional_api_is_kept(name):
    import fastclip
    import fastclip.functional as functional

    assert getattr(functional, name) is getattr(fastclip, name)
