"""The Transport protocol (comm/transport/base.py) is the whole contract between the collective
algorithms and the transports: an algorithm uses no member of its transport that the protocol
does not declare, and both MPITransport and SimTransport implement every member.

The algorithms are read with ``ast`` (not run): every use ``t.<name>``, ``getattr(t, "<name>")``
or ``hasattr(t, "<name>")`` of a transport, where a transport is a parameter annotated
``Transport`` (``MPITransport`` in native.py, which is MPI's own code and checked against that
class), a closure's view of one, or a name bound from a same-module function that returns
transports (hier's ``groups``). Every parameter named ``t`` must carry such an annotation.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import mpipar.comm
from mpipar.comm.network import Network, Profile
from mpipar.comm.transport.base import SendRecv, Transport
from mpipar.comm.transport.sim import Engine

COMM_DIR = Path(mpipar.comm.__file__).resolve().parent
ALGORITHM_FILES = sorted((COMM_DIR / "algorithms").glob("*.py")) + [COMM_DIR / "native.py",
                                                                       COMM_DIR / "transport" / "base.py"]
TRANSPORT_TYPES = ("Transport", "MPITransport")


def protocol_members(proto: type) -> set[str]:
    """Attributes (annotated) and methods or properties declared by a Protocol class."""
    names = set(proto.__dict__.get("__annotations__", {}))
    names |= {n for n in vars(proto) if not n.startswith("_")}
    return names


PROTOCOL = protocol_members(Transport)
CALLABLE_MEMBERS = {n for n in PROTOCOL if inspect.isfunction(vars(Transport).get(n))}
OPTIONAL_CALLABLES = {"sendrecv": SendRecv.__call__}  # properties: a callable, or None


def class_members(path: Path, name: str) -> set[str]:
    """What class ``name`` in ``path`` defines: methods, class attributes and every
    ``self.<attr> = ...`` in its methods."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    out: set[str] = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(cls):
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                out.add(t.attr)
    return out


MPI_MEMBERS = class_members(COMM_DIR / "transport" / "mpi.py", "MPITransport")
SIM_MEMBERS = class_members(COMM_DIR / "transport" / "sim.py", "SimTransport")
ALLOWED = {"Transport": PROTOCOL, "MPITransport": MPI_MEMBERS}


def _names_in(annotation: ast.expr | None) -> list[str]:
    """The identifiers an annotation is made of (a quoted one too)."""
    if annotation is None:
        return []
    text = ast.unparse(annotation)
    for ch in "'\"[],|":
        text = text.replace(ch, " ")
    return text.split()


def _transport_type(annotation: ast.expr | None) -> str | None:
    """The transport an annotation is: ``Transport``, ``MPITransport``, either ``| None`` or in
    ``Optional[...]`` (quoted or not); None for anything else."""
    names = [n for n in _names_in(annotation) if n not in ("None", "Optional")]
    return names[0] if len(names) == 1 and names[0] in TRANSPORT_TYPES else None


def _returned_transport(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The transport type a function's return annotation holds anywhere (a tuple of them)."""
    return next((n for n in _names_in(fn.returns) if n in TRANSPORT_TYPES), None)


Use = tuple[str, int, str, str]  # (function, line, transport type, member used)


def transport_uses(source: str, filename: str = "<source>") -> tuple[list[Use], list[str]]:
    """(every use of a transport's member, [problems: an unannotated ``t``, a ``getattr`` of
    a computed name])."""
    tree = ast.parse(source)
    returns_transports = {f.name: _returned_transport(f) for f in ast.walk(tree)
                          if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    uses: list[Use] = []
    problems: list[str] = []

    def visit_function(fn: ast.FunctionDef | ast.AsyncFunctionDef, outer: dict[str, str]) -> None:
        names = dict(outer)
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        for a in args:
            kind = _transport_type(a.annotation)
            if kind is not None:
                names[a.arg] = kind
            else:
                names.pop(a.arg, None)  # a parameter shadows an outer transport
                if a.arg == "t":
                    ann = ast.unparse(a.annotation) if a.annotation is not None else "nothing"
                    problems.append(f"{filename}:{fn.lineno} {fn.name}(t: {ann}): annotate t "
                                    f"with Transport (MPITransport in native.py)")

        def walk(node: ast.AST) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit_function(node, names)
                return
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                f = node.value.func
                kind = returns_transports.get(f.id) if isinstance(f, ast.Name) else None
                if kind is not None:
                    for target in node.targets:
                        elts = target.elts if isinstance(target, ast.Tuple) else [target]
                        for e in elts:
                            if isinstance(e, ast.Name):
                                names[e.id] = kind
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in names):
                uses.append((fn.name, node.lineno, names[node.value.id], node.attr))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in names):
                what = node.args[1]
                if isinstance(what, ast.Constant) and isinstance(what.value, str):
                    uses.append((fn.name, node.lineno, names[node.args[0].id], what.value))
                else:
                    problems.append(f"{filename}:{node.lineno} {fn.name}: {node.func.id} of a "
                                    f"transport with a computed name")
            for child in ast.iter_child_nodes(node):
                walk(child)

        for stmt in fn.body:
            walk(stmt)

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit_function(item, {})
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            visit_function(node, {})
    return uses, problems


def undeclared(uses: list[Use], filename: str) -> list[str]:
    return [f"{filename}:{line} {fn} uses {kind}.{attr}, which {kind} does not declare"
            for fn, line, kind, attr in uses if attr not in ALLOWED[kind]]


@pytest.mark.parametrize("path", ALGORITHM_FILES, ids=lambda p: p.name)
def test_algorithms_use_only_what_the_protocol_declares(path):
    uses, problems = transport_uses(path.read_text(), path.name)
    assert not problems, "\n".join(problems)
    bad = undeclared(uses, path.name)
    assert not bad, "\n".join(bad)


def test_the_scan_sees_the_algorithms_uses():
    """Guard against a scan that passes because it found nothing: the members the algorithms
    are known to use are all seen, each as a Transport's."""
    seen = {attr for p in ALGORITHM_FILES for _, _, kind, attr in transport_uses(p.read_text())[0]
            if kind == "Transport"}
    assert {"rank", "size", "isend", "irecv", "reduce_local", "split", "cache", "sendrecv",
            "scratch_pool", "ranks_per_node", "shared_node"} <= seen
    native = {attr for _, _, kind, attr in transport_uses((COMM_DIR / "native.py").read_text())[0]}
    assert {"comm", "MPI"} <= native  # native is MPI's code: checked against MPITransport


def test_the_scan_fails_on_planted_violations():
    src = '''
from typing import Any

def allreduce(t: Transport, buf, op):
    t.comm.Allreduce(buf)               # MPI-only: not the protocol's
    if getattr(t, "magic", None):
        pass
    def inner():
        return t.secret                  # seen through the closure
    local, leaders = groups(t)
    return local.hidden

def groups(t: Transport) -> tuple[Transport, Transport | None]:
    return t.split(0, 0), None

def loose(t: Any, x):
    return t.rank

class Step:
    def run(self, t: "Transport"):
        t.barrier(); t.nonsense()
'''
    uses, problems = transport_uses(src)
    bad = undeclared(uses, "planted.py")
    assert sorted(b.split(" uses ")[1].split(",")[0] for b in bad) == [
        "Transport.comm", "Transport.hidden", "Transport.magic", "Transport.nonsense", "Transport.secret"]
    assert len(problems) == 1 and "loose(t: Any)" in problems[0]


@pytest.mark.parametrize("members, cls", [(MPI_MEMBERS, "MPITransport"), (SIM_MEMBERS, "SimTransport")])
def test_both_transports_define_every_protocol_member(members, cls):
    missing = sorted(PROTOCOL - members)
    assert not missing, f"{cls} lacks protocol members {missing}"


def _check_instance(t: object) -> None:
    """A live transport has every member, with the protocol's parameters for its methods."""
    assert isinstance(t, Transport)
    missing = [n for n in PROTOCOL if not hasattr(t, n)]
    assert not missing, f"{type(t).__name__} lacks {missing}"
    for name in CALLABLE_MEMBERS | set(OPTIONAL_CALLABLES):
        impl = getattr(t, name)
        if impl is None:
            assert name in OPTIONAL_CALLABLES, f"{name} is not optional"
            continue
        want = OPTIONAL_CALLABLES.get(name) or vars(Transport)[name]
        expected = list(inspect.signature(want).parameters)[1:]  # less self
        assert list(inspect.signature(impl).parameters) == expected, name
    assert isinstance(t.rank, int) and isinstance(t.size, int) and 0 <= t.rank < t.size
    assert isinstance(t.cache, dict)
    assert t.ranks_per_node is None or isinstance(t.ranks_per_node, int)
    assert t.shared_node is None or callable(t.shared_node)


def test_a_simulated_transport_conforms():
    prof = Profile.simple(1e-6, 1e-9).with_topology(2)
    engine = Engine(Network(prof, 4), 4, data=False)
    res = engine.run(lambda t: (t, t.dup(), t.split(t.rank % 2, t.rank)))
    for world, dup, sub in res.results:
        for t in (world, dup, sub):
            _check_instance(t)
        assert world.ranks_per_node == 2 and sub.ranks_per_node is None  # only the world group
        assert world.scratch_pool is None and world.shared_node is None


@pytest.mark.mpi(min_size=1)
def test_an_mpi_transport_conforms(comm):
    for t in (comm.transport, comm.p2p):
        _check_instance(t)
        assert t.ranks_per_node is None and t.scratch_pool is not None
    node = comm.transport.shared_node()  # one machine here: one node, named after rank 0
    assert node == 0
