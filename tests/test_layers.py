"""Dependencies point one way: every import inside the package (module level or inside a
function) goes to the same layer or one below it, and no module imports close a cycle.

The layers, bottom to top (README "Layout"): an import that points up, or a cycle among
modules, fails here with the offending import named.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "engram_local"

# Bottom to top. `engram_local.convert` ships from the top-level convert/ directory.
LAYERS = ["constants", "native", "text", "formats", "model", "convert", "runtime", "memory", "store",
          "train", "eval", "serve", "commands", "cli"]
# Modules kept at their old import paths for callers outside the package (issue contracts):
# they only re-export, and nothing inside the package may import them.
SHIMS = {"engram_local.hashing"}


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "convert", f"{PACKAGE}.convert")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module inside the package, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith(PACKAGE):
                continue
            # the longest known module the name refers to (a name imported from a module is not one)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != PACKAGE:
                out.append((t, node.lineno))
    return out


def _layer(mod: str) -> str:
    return mod.split(".")[1].removeprefix("_")


def _graph():
    mods = _modules()
    known = set(mods)
    return mods, {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_module_belongs_to_a_layer():
    mods, _ = _graph()
    stray = [m for m in mods if m != PACKAGE and m not in SHIMS
             and _layer(m) not in LAYERS and _layer(m) != "engram_native"]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_point_down():
    mods, graph = _graph()
    bad = []
    for mod, imps in graph.items():
        if mod == PACKAGE or mod in SHIMS:
            continue
        here = LAYERS.index(_layer(mod))
        for target, line in imps:
            if target in SHIMS:
                bad.append(f"{mods[mod].relative_to(ROOT)}:{line} imports the compatibility shim {target}")
            elif _layer(target) != "engram_native" and LAYERS.index(_layer(target)) > here:
                bad.append(f"{mods[mod].relative_to(ROOT)}:{line} ({_layer(mod)}) imports {target} "
                           f"({_layer(target)}), a higher layer")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods, graph = _graph()
    edges = {m: sorted({t for t, _ in imps if t != m and not m.startswith(t + ".")})
             for m, imps in graph.items()}
    # Tarjan's strongly connected components
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not sccs, "import cycles: " + "; ".join(" <-> ".join(c) for c in sccs)
