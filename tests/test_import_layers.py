"""The package's layers point one way: no module imports from a layer above its own.

Layers, bottom to top (see mpipar/__init__.py and docs/architecture.md)::

    0  mpipar.backend, mpipar.runtime, mpipar.trace (and the mpipar package itself)
    1  mpipar.comm
    2  mpipar.nn, mpipar.optim, mpipar.data
    3  mpipar.parallel
    4  mpipar.sim
    5  mpipar.bench
    6  command lines: mpipar.train, mpipar.plan, mpipar.plot, mpipar.cli (their shared
       argument helpers), mpipar.testing*, every ``__main__``

Every module of ``mpipar/`` is parsed (never imported) and every import is found: at module
level, inside functions, under ``if TYPE_CHECKING:``, relative ones (resolved against the
importing module), and ``importlib.import_module`` / ``__import__`` of a string literal (an
f-string's literal prefix, as a plugin look-up ``f"mpipar.comm.algorithms.{name}"``, counts as
an import of the package it names). Asserted:

(a) no module imports a module of a higher layer;
(b) packages of one layer (nn, optim and data; backend and runtime) form no import cycle;
(c) no function-level import of an ``mpipar`` module, apart from ``FUNCTION_LEVEL_ALLOWED``
    (start-up time only: a function-level import must never hide a cycle);
(d) the checker itself finds each kind of violation in planted sources, so these tests can fail;
and, since imports now sit at module level, that importing any library module (layers 0-5)
still does not initialise MPI.

(Named test_import_layers.py: tests/nn/test_layers.py holds the nn layers' tests, and test
modules outside packages need distinct basenames.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import mpipar

PACKAGE_DIR = Path(mpipar.__file__).resolve().parent

LAYER_OF_PACKAGE = {"backend": 0, "runtime": 0, "trace": 0, "kernels": 0, "comm": 1, "nn": 2,
                    "optim": 2, "data": 2, "parallel": 3, "sim": 4, "bench": 5, "train": 6, "testing": 6,
                    "cli": 6, "plan": 6, "plot": 6}
LAYER_NAMES = {0: "backend/runtime", 1: "comm", 2: "nn/optim/data", 3: "parallel", 4: "sim",
               5: "bench", 6: "command line"}

# (importer, imported) -> why this function-level import of an mpipar module is needed. Only
# start-up time is a reason (e.g. a module that initialises MPI when imported); an import
# placed in a function to break a cycle is a layering defect to fix, not to list here.
FUNCTION_LEVEL_ALLOWED: dict[tuple[str, str], str] = {}


def layer(module: str) -> int:
    """The layer of a module of mpipar (``mpipar.x.y``)."""
    parts = module.split(".")
    if parts[0] != "mpipar":
        raise ValueError(f"{module} is not a module of mpipar")
    if parts[-1] == "__main__":
        return 6
    if len(parts) == 1:
        return 0  # the package itself: imported by everything, so it may import nothing above 0
    if parts[1] not in LAYER_OF_PACKAGE:
        raise ValueError(f"{module}: package mpipar.{parts[1]} has no layer; add it to LAYER_OF_PACKAGE")
    return LAYER_OF_PACKAGE[parts[1]]


def package_of(module: str) -> str:
    """``mpipar.nn.gpt`` -> ``mpipar.nn``; ``mpipar.runtime`` -> ``mpipar.runtime``."""
    return ".".join(module.split(".")[:2])


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    function_level: bool
    kind: str  # "import", "from-import", "TYPE_CHECKING import", "import_module", "plugin prefix"

    def __str__(self) -> str:
        where = "function-level " if self.function_level else ""
        return f"{self.importer} line {self.line}: {where}{self.kind} of {self.imported}"


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _dynamic_import_target(call: ast.Call) -> tuple[str, str] | None:
    """(module, kind) of ``importlib.import_module("...")`` / ``import_module(...)`` /
    ``__import__(...)`` with a literal (or an f-string with a literal prefix)."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value, "import_module"
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        if "." in prefix:  # "mpipar.comm.algorithms.{name}": a module of that package
            return prefix.rsplit(".", 1)[0], "plugin prefix"
    return None


def imports_in(module: str, source: str, is_package: bool = False,
               known: frozenset[str] | set[str] = frozenset()) -> list[Import]:
    """Every import of an mpipar module in ``source`` (the text of ``module``).

    ``from pkg import name`` is an import of ``pkg.name`` where that is a module in
    ``known``, else of ``pkg``."""
    tree = ast.parse(source)
    found: list[Import] = []
    base = module.split(".") if is_package else module.split(".")[:-1]

    def add(target: str, node: ast.AST, in_function: bool, kind: str) -> None:
        if target == "mpipar" or target.startswith("mpipar."):
            found.append(Import(module, target, node.lineno, in_function, kind))

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, in_function, "TYPE_CHECKING import" if type_checking else "import")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(base):
                    raise ValueError(f"{module} line {node.lineno}: relative import beyond the top")
                parts = base[:len(base) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            kind = "TYPE_CHECKING import" if type_checking else "from-import"
            resolved = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                        for a in node.names]
            for name in dict.fromkeys(resolved):  # one entry per module, not per name
                add(name, node, in_function, kind)
        elif isinstance(node, ast.Call):
            dyn = _dynamic_import_target(node)
            if dyn is not None:
                add(dyn[0], node, in_function, dyn[1])
        inner_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                          ast.Lambda))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            visit(node.test, in_function, type_checking)
            for child in node.body:
                visit(child, inner_function, True)
            for child in node.orelse:
                visit(child, inner_function, type_checking)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, inner_function, type_checking)

    visit(tree, False, False)
    return found


def upward_imports(imports: list[Import]) -> list[str]:
    """(a): imports of a module in a higher layer than the importer's."""
    out = []
    for imp in imports:
        lo, hi = layer(imp.importer), layer(imp.imported)
        if hi > lo:
            out.append(f"{imp}: layer {lo} ({LAYER_NAMES[lo]}) imports layer {hi} ({LAYER_NAMES[hi]})")
    return out


def function_level_imports(imports: list[Import],
                           allowed: dict[tuple[str, str], str] = FUNCTION_LEVEL_ALLOWED) -> list[str]:
    """(c): function-level imports of mpipar modules not in ``allowed``."""
    return [str(imp) for imp in imports
            if imp.function_level and imp.kind != "plugin prefix"
            and (imp.importer, imp.imported) not in allowed]


def package_cycles(imports: list[Import]) -> list[list[str]]:
    """(b): cycles among packages of the same layer (each cycle as its packages in order)."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        a, b = package_of(imp.importer), package_of(imp.imported)
        if a != b and b != "mpipar" and layer(imp.importer) == layer(imp.imported) != 6:
            edges.setdefault(a, set()).add(b)
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(path: list[str]) -> None:
        for nxt in sorted(edges.get(path[-1], ())):
            if nxt == path[0]:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    cycles.append(path + [nxt])
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its least package
                walk(path + [nxt])

    for start in sorted(edges):
        walk([start])
    return cycles


# -- the package as it is ----------------------------------------------------------------------
def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _scan() -> dict[str, list[Import]]:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    names = {_module_name(p)[0] for p in files}
    out = {}
    for path in files:
        name, is_package = _module_name(path)
        out[name] = imports_in(name, path.read_text(), is_package, names)
    return out


SCAN = _scan()
MODULES = sorted(SCAN)
ALL_IMPORTS = [imp for imps in SCAN.values() for imp in imps]


def test_the_scan_sees_the_package():
    """Guard against a checker that passes because it looked at nothing."""
    assert len(MODULES) > 60 and "mpipar.comm.communicator" in MODULES and "mpipar.sim.__main__" in MODULES
    assert any(i.imported == "mpipar.comm.algorithms" for i in SCAN["mpipar.comm.communicator"])
    assert any(i.imported == "mpipar.backend" for i in SCAN["mpipar.comm.ops"])
    assert any(i.imported == "mpipar.comm.network" for i in SCAN["mpipar.sim.run"])
    for name in MODULES:
        layer(name)  # every module has a layer


@pytest.mark.parametrize("module", MODULES)
def test_no_import_from_a_higher_layer(module):
    bad = upward_imports(SCAN[module])
    assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def test_no_import_cycle_between_packages_of_one_layer():
    cycles = package_cycles(ALL_IMPORTS)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", MODULES)
def test_no_function_level_import_of_mpipar(module):
    bad = function_level_imports(SCAN[module])
    assert not bad, ("function-level imports (move them to module level; a cycle is fixed by "
                     "moving the shared piece down):\n  " + "\n  ".join(bad))


def test_allow_list_entries_are_still_needed():
    present = {(i.importer, i.imported) for i in ALL_IMPORTS if i.function_level}
    stale = [k for k in FUNCTION_LEVEL_ALLOWED if k not in present]
    assert not stale, f"allowed function-level imports that no longer exist: {stale}"


def test_importing_the_library_does_not_initialise_mpi():
    """Module-level imports must not cost MPI start-up: every library module (layers 0-5)
    imports without mpi4py.MPI (make_communicator initialises it)."""
    library = [m for m in MODULES if layer(m) < 6]
    code = ("import importlib, sys\n"
            f"for m in {library!r}:\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except ImportError as e:\n"
            "        if 'mpipar' in str(e): raise\n"  # an optional dependency may be missing
            "print('mpi4py.MPI' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing the library initialised MPI"


# -- (d) the checker fails on planted violations -----------------------------------------------
def _check(module: str, source: str, is_package: bool = False) -> list[Import]:
    return imports_in(module, source, is_package, set(MODULES))


def test_checker_finds_a_module_level_upward_import():
    bad = upward_imports(_check("mpipar.comm.fake", "from mpipar.sim.network import Profile\n"))
    assert len(bad) == 1 and "mpipar.comm.fake line 1" in bad[0] and "mpipar.sim.network" in bad[0]


def test_checker_finds_a_function_level_upward_import():
    src = "import os\n\n\ndef f():\n    from mpipar.bench import report\n    return report\n"
    imps = _check("mpipar.sim.fake", src)
    assert [i.line for i in imps] == [5] and imps[0].function_level
    assert imps[0].imported == "mpipar.bench.report"
    assert upward_imports(imps) and function_level_imports(imps)
    assert not function_level_imports(imps, {("mpipar.sim.fake", "mpipar.bench.report"): "test"})


def test_checker_resolves_relative_imports():
    imps = _check("mpipar.comm.fake", "from ..sim import run\nfrom . import ops\n")
    assert [i.imported for i in imps] == ["mpipar.sim.run", "mpipar.comm.ops"]
    assert len(upward_imports(imps)) == 1
    pkg = _check("mpipar.comm", "from .auto import choose\nfrom .. import bench\n", is_package=True)
    assert [i.imported for i in pkg] == ["mpipar.comm.auto", "mpipar.bench"]
    assert len(upward_imports(pkg)) == 1


def test_checker_finds_type_checking_imports():
    src = ("from typing import TYPE_CHECKING\n"
           "if TYPE_CHECKING:\n    from mpipar.parallel.mesh import Mesh\n")
    imps = _check("mpipar.nn.fake", src)
    assert [(i.kind, i.line) for i in imps] == [("TYPE_CHECKING import", 3)]
    assert upward_imports(imps)


def test_checker_finds_import_module_of_a_literal():
    src = ("import importlib\n\n\ndef load():\n"
           "    return importlib.import_module('mpipar.bench.collectives')\n\n\n"
           "def plugin(name):\n    return importlib.import_module(f'mpipar.bench.{name}')\n")
    imps = _check("mpipar.sim.fake", src)
    assert [(i.imported, i.kind) for i in imps] == [("mpipar.bench.collectives", "import_module"),
                                                    ("mpipar.bench", "plugin prefix")]
    assert len(upward_imports(imps)) == 2
    assert len(function_level_imports(imps)) == 1  # a literal is a hidden import; a plugin is not


def test_checker_finds_a_cycle_between_packages_of_one_layer():
    imps = (_check("mpipar.nn.fake", "from mpipar.optim import sgd\n")
            + _check("mpipar.optim.fake", "def f():\n    import mpipar.data.corpus\n")
            + _check("mpipar.data.fake", "from mpipar.nn.gpt import GPT\n"))
    assert package_cycles(imps) == [["mpipar.data", "mpipar.nn", "mpipar.optim", "mpipar.data"]]
    assert package_cycles(imps[:2]) == []  # a chain is not a cycle


def test_checker_passes_clean_code():
    src = ("from __future__ import annotations\nimport numpy as np\nfrom mpipar import backend\n"
           "from mpipar.comm import make_communicator\n\n\ndef f():\n    import torch\n")
    imps = _check("mpipar.parallel.fake", src)
    assert [i.imported for i in imps] == ["mpipar.backend", "mpipar.comm"]
    assert not upward_imports(imps) and not function_level_imports(imps) and not package_cycles(imps)
    assert layer("mpipar.sim.__main__") == layer("mpipar.train") == layer("mpipar.testing.launch") == 6
