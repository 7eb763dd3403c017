"""The layer order of DESIGN.md ("Layers"), enforced on every import statement in
compactor/, wherever it stands (module level, inside functions, under TYPE_CHECKING).

A unit is a top-level module or subpackage of compactor (``measure`` for
``compactor.measure.latency``). A unit may import itself and the units listed before it,
never one after it, so the import graph between units has no cycle; inside a unit the
modules' own graph must have no cycle either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "compactor"

# Lowest first; DESIGN.md's layers, refined into a total order.
ORDER = [
    # foundations
    "errors", "version", "yamlsafe", "spec", "verdict", "stage", "progress", "_imports", "examples",
    # data, model, metrics, measure, profiles, export machinery
    "profiles", "data", "metrics", "model", "measure",
    "budgets", "results", "manifest", "exporting",
    # rendering of a manifest to text (pure: the artifact embeds the reports)
    "report",
    # the machinery behind passes
    "quantization", "pruning", "training", "partition",
    "passes",
    "recipe",
    # applications
    "artifact", "pipeline", "check", "sensitivity",
    # a Triton repository of artifacts, gated on check --against the live version
    "deploy",
    # the only code that prints
    "cli",
    # the public API (package __init__)
    "",
]
RANK = {u: i for i, u in enumerate(ORDER)}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod
                     for a in node.names]
        for n in names:
            target = _resolve(n) if n.split(".")[0] == "compactor" else None
            if target and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_unit_has_a_layer():
    missing = sorted({_unit(m) for m in MODULES} - set(RANK))
    assert not missing, f"add these to ORDER (and DESIGN.md's layers): {missing}"


def test_imports_only_go_down():
    upward = [
        f"{m} imports {t} ({_unit(t) or 'compactor'} is above {_unit(m) or 'compactor'})"
        for m, targets in sorted(GRAPH.items())
        for t in sorted(targets)
        if _unit(t) != _unit(m) and RANK[_unit(t)] > RANK[_unit(m)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert cycles == [], cycles


def test_check_is_light():
    """`check` runs on an edge device beside onnxruntime alone."""
    code = (
        "import sys, compactor.check, compactor.cli.check_cmd\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torch_pruning', 'sklearn', 'onnxsim', 'transformers')"
        " or m.startswith('compactor.passes') or m == 'compactor.recipe']\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_reverse_dependencies_are_recorded():
    """Every unit appears in the graph (a typo in ORDER would hide a unit's imports)."""
    seen = defaultdict(int)
    for m in GRAPH:
        seen[_unit(m)] += 1
    assert all(seen[u] for u in seen)
