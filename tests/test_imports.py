"""The dependency rule (docs/architecture.md): every import in collapse_sim, at module
level or inside a function, points to the module's own unit or to a lower layer, and
no modules import each other in a cycle. Checked on the source with ``ast``, so an
import that only runs on some path counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "collapse_sim"

#: Lowest first. A unit is a top-level module or subpackage of collapse_sim
#: ("collapse_sim" is the package's own __init__: the version, enable_x64).
LAYERS = (
    ("errors",),
    ("compilation", "elementwise", "formats", "positional"),
    ("rounding", "progress", "lanes"),
    ("collapse_sim", "mx"),
    ("policy", "results"),
    ("backends",),
    ("model",),
    ("families", "plots"),
    ("pairing",),
    ("theory",),
    ("experiments", "testing"),
    ("report",),
    ("cli",),
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = ("collapse_sim", *path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(module: str, path: Path, known: dict[str, Path], source: str | None = None,
            names: bool = False) -> list[tuple]:
    """``(imported collapse_sim module, line)`` for every import statement in the file (or in
    ``source``, read as that file), at any depth. ``from pkg import name`` names the
    submodule ``pkg.name`` where there is one. ``names``: ``(module, line, name)`` for every
    name a ``from`` import takes from a module."""
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import) and not names:
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "collapse_sim"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "collapse_sim":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if names:
                    if sub not in known:
                        out.append((base, node.lineno, a.name))
                else:
                    out.append((sub if sub in known else base, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def upward_imports(g) -> list[str]:
    bad = []
    for m, deps in g.items():
        for dep, line in deps:
            a, b = unit(m), unit(dep)
            if a != b and LAYER[b] >= LAYER[a]:
                bad.append(f"{m} (line {line}) imports {dep}: layer {LAYER[b]} ({b}) is not below "
                           f"layer {LAYER[a]} ({a})")
    return bad


def cycles(g) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in g.get(v, ()):
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

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_every_unit_has_a_layer():
    missing = sorted({unit(m) for m in modules()} - set(LAYER))
    assert not missing, f"units without a layer in LAYERS: {missing}"


def test_imports_point_down():
    bad = upward_imports(graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "modules importing each other in a cycle: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_names_across_units():
    """A unit uses another unit's public names only (a private name there is free to change)."""
    known = modules()
    bad = [f"{m} (line {line}) imports {name} from {dep}"
           for m, p in known.items() for dep, line, name in imports(m, p, known, names=True)
           if name.startswith("_") and name != "__version__" and unit(dep) != unit(m)]
    assert not bad, "private names imported from another unit:\n" + "\n".join(bad)


def _planted(module: str, line: str):
    """The import graph with ``line`` appended inside a function of ``module``'s file."""
    known = modules()
    g = graph()
    source = known[module].read_text() + f"\n\ndef _planted():\n    {line}\n"
    g[module] = imports(module, known[module], known, source)
    return g


def test_checker_finds_a_planted_upward_import():
    """A function-level import of the report from a backend is named, with its line."""
    g = _planted("collapse_sim.backends.native", "from ..report import provenance")
    n = len(modules()["collapse_sim.backends.native"].read_text().splitlines())
    assert f"collapse_sim.backends.native (line {n + 4}) imports collapse_sim.report: layer 11 (report) is not below " \
           "layer 5 (backends)" in upward_imports(g)


def test_checker_finds_a_planted_cycle():
    """theory.oversquash imports theory.trace; trace importing oversquash back is a cycle."""
    g = _planted("collapse_sim.theory.trace", "from .oversquash import sensitivity")
    assert ["collapse_sim.theory.oversquash", "collapse_sim.theory.trace"] in cycles(g)
