"""The package layers of DESIGN.md §2, checked by walking every import under sage_jax/ with `ast`.

Low to high: a package may import only its own modules and packages in a lower layer. Every import
counts: module level, inside functions (a lazy import must not hide an upward arrow or a cycle),
``import x``, ``from x import y`` (``y`` may be a submodule), relative imports, and the
``"module:Class:fn"`` strings that config.add_config_command imports when a command runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sage_jax"

# Low to high. Units in one layer do not import each other (model/data, train/rollout, eval/serve...).
LAYERS: list[tuple[str, ...]] = [
    ("progress", "net", "sage_jax"),  # standalone helpers (progress bar, loopback check) and the package root: import nothing of ours
    ("sac", "config", "compile_cache"),  # compile_cache: the entry points' XLA cache (reads the root's cache_root)
    ("parallel",),
    ("model", "data"),
    ("train", "rollout"),
    ("judge",),
    ("search",),
    ("eval", "serve", "aot"),
    ("report",),
    ("loop",),
    ("demo",),
    ("cli", "__main__"),
]
# Lower packages that must never import above themselves: spelled out so a table edit cannot drop them.
FLOOR = ("model", "sac", "data", "parallel")

# Arrows known to be wrong, each with what removes it. The test fails when one is no longer there,
# so the list can only shrink.
KNOWN = {
}

_TARGET_STRING = re.compile(r"^(sage_jax(?:\.\w+)+):\w+")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """``sage_jax.data.cli`` -> ``data``; ``sage_jax.cli`` -> ``cli``; ``sage_jax`` -> ``sage_jax``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def collect_imports(root: Path) -> dict[str, list[tuple[str, int]]]:
    """Each module under ``root`` -> the modules of ``root``'s package it imports, with line numbers."""
    top = root.name
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}

    def resolve(name: str, line: int) -> tuple[str, int] | None:
        # the longest known module that ``name`` names (``a.b.Class`` -> ``a.b``)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return (name, line) if name else None

    out: dict[str, list[tuple[str, int]]] = {}
    for f in files:
        mod = module_name(f, root)
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        found: list[tuple[str, int]] = []
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), filename=str(f))):
            if isinstance(node, ast.Import):
                found += [(a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                found.append((origin, node.lineno))
                # ``from pkg import sub`` imports the module ``pkg.sub`` when there is one
                found += [(f"{origin}.{a.name}", node.lineno) for a in node.names
                          if f"{origin}.{a.name}" in modules]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                m = _TARGET_STRING.match(node.value)
                if m:
                    found.append((m.group(1), node.lineno))
        out[mod] = [r for name, line in found
                    if (name == top or name.startswith(top + ".")) and (r := resolve(name, line))]
    return out


def check(root: Path, layers: list[tuple[str, ...]] = LAYERS, known: dict = {}) -> list[str]:  # noqa: B006
    """Every problem found: unmapped modules, arrows not going strictly down (but the ``known``
    (module, target) ones) and cycles between units."""
    rank = {u: i for i, group in enumerate(layers) for u in group}
    imports = collect_imports(root)
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for mod, targets in sorted(imports.items()):
        src = unit_of(mod)
        if src not in rank:
            problems.append(f"{mod}: package {src!r} is in no layer (add it to LAYERS and DESIGN.md §2)")
            continue
        for target, line in targets:
            dst = unit_of(target)
            if dst == src:
                continue
            if (mod, target) not in known:
                edges.setdefault(src, set()).add(dst)
            if dst not in rank:
                continue  # reported as unmapped on its own
            if rank[dst] >= rank[src] and (mod, target) not in known:
                how = "a peer in the same layer" if rank[dst] == rank[src] else "a higher layer"
                problems.append(f"{mod}:{line} imports {target} ({src} -> {dst}: {how})")
    for cycle in _cycles(edges):
        problems.append("cycle between packages: " + " -> ".join(cycle + [cycle[0]]))
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan), each listed sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_sage_jax_respects_layers():
    problems = check(ROOT, known=KNOWN)
    assert not problems, "imports against DESIGN.md §2 layers:\n" + "\n".join(problems)


def test_known_exceptions_are_still_needed():
    imports = collect_imports(ROOT)
    stale = [f"{m} -> {t}: {why}" for (m, t), why in KNOWN.items() if t not in {x for x, _ in imports.get(m, [])}]
    assert not stale, "no longer imported, remove from KNOWN:\n" + "\n".join(stale)


def test_floor_packages_exist_and_are_low():
    rank = {u: i for i, group in enumerate(LAYERS) for u in group}
    for unit in FLOOR:
        assert (ROOT / unit).is_dir(), unit
        assert rank[unit] <= rank["model"], unit


def _plant(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "sage_jax"
    for rel, text in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return pkg


CLEAN = {
    "__init__.py": "",
    "sac/__init__.py": "from sage_jax.sac.schema import X\n",
    "sac/schema.py": "X = 1\n",
    "model/__init__.py": "from .core import f\n",
    "model/core.py": "from sage_jax.sac import X\n\ndef f():\n    from . import core\n",
    "train/__init__.py": "",
    "train/loop.py": "from sage_jax import model\nimport sage_jax.sac.schema\n",
    "judge/__init__.py": "",
    "cli.py": "def main():\n    from sage_jax.train import loop\n    run('sage_jax.judge:Config:run')\n",
}


def test_checker_passes_a_clean_tree(tmp_path):
    assert check(_plant(tmp_path, CLEAN)) == []


@pytest.mark.parametrize("where, text, target", [
    # a function-level relative import from the floor up to train
    ("model/core.py", "def g():\n    from ..train import loop\n", "sage_jax.train.loop"),
    # `from pkg import submodule`, module level
    ("sac/schema.py", "from sage_jax.model import core\n", "sage_jax.model.core"),
    # plain `import a.b.c`
    ("train/loop.py", "import sage_jax.judge\n", "sage_jax.judge"),
    # a command registered by string from a lower package
    ("model/core.py", "T = 'sage_jax.cli:Config:main'\n", "sage_jax.cli"),
])
def test_checker_catches_a_planted_upward_import(tmp_path, where, text, target):
    files = dict(CLEAN)
    files[where] = files[where] + text
    line = files[where].count("\n")  # the planted import is the last line
    mod = "sage_jax." + where.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    problems = check(_plant(tmp_path, files))
    assert any(p.startswith(f"{mod}:{line} imports {target} (") and "a higher layer" in p for p in problems), problems


def test_checker_catches_peers_cycles_and_unmapped(tmp_path):
    files = dict(CLEAN)
    files["data/__init__.py"] = "def f():\n    from sage_jax.model import core\n"
    files["model/core.py"] += "import sage_jax.data\n"
    files["extras/__init__.py"] = ""
    problems = check(_plant(tmp_path, files))
    assert any("sage_jax.data:2 imports sage_jax.model.core (data -> model: a peer" in p for p in problems), problems
    assert any("model -> data: a peer" in p for p in problems), problems
    assert "cycle between packages: data -> model -> data" in problems, problems
    assert any(p.startswith("sage_jax.extras: package 'extras' is in no layer") for p in problems), problems
