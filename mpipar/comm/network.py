"""Network profiles: the alpha-beta-gamma numbers the simulator and the cost model share.

They belong to ``comm``, the lowest layer that uses them: the cost model and
``algorithm="auto"`` (``comm/cost_model.py``, ``comm/auto.py``) and the simulated transport
(``comm/transport/sim.py``, which prices messages with ``Network``); ``mpipar.sim``, above,
re-exports them.

A message of ``n`` bytes costs ``alpha + n * beta`` seconds (Hockney's model), with ``alpha``
and ``beta`` chosen by the message's size class (small messages go eagerly, large ones by
rendezvous and often at another bandwidth); combining ``n`` bytes locally costs
``n * gamma``; the Communicator's copy of each rank's input into a fresh work buffer, before
the algorithm starts, costs ``n * copy`` (0 where not measured). Both may instead be given
size classes like a link's (``"reduce"`` and ``"copy"`` below: ``alpha + n * beta`` by the
size of the buffer, since a reduction or copy that fits in cache runs several times faster
than one that streams from memory, and each call has a fixed cost). An optional two-level
topology gives links inside a node (NVLink, shared memory) and between nodes (InfiniBand)
their own classes.

A profile is a JSON file (all times in seconds, ``beta``/``gamma`` in seconds per byte)::

    {"name": "dgx-h100",
     "metadata": {"source": "datasheet" | "measured", "host": ..., "date": ..., ...},
     "gamma_s_per_byte": 2.5e-13,
     "eager_limit_bytes": 65536,
     "classes": [{"max_bytes": 65536, "alpha_s": 3e-6, "beta_s_per_byte": 2.5e-11},
                 {"max_bytes": null,  "alpha_s": 5e-6, "beta_s_per_byte": 2.5e-11}],
     "post_overhead_s": 4e-6,           (optional: a rank's time per isend/irecv posted)
     "call_overhead_s": {"ring": 1e-5}, (optional: per algorithm, each rank's fixed time
                                         per collective call: argument checks, set-up)
     "reduce": {"classes": [...]},      (optional: replaces gamma_s_per_byte)
     "copy": {"classes": [...]},        (optional: replaces copy_s_per_byte)
     "oneway": {"classes": [...]},      (optional, flat network only: a message whose sender
                                         is not receiving meanwhile; ``classes`` then price
                                         the messages of a rank that sends and receives at
                                         once, as in an exchange)
     "transfers_need_cpu": true,        (optional, flat network only: a rendezvous transfer
                                         stalls while its receiver computes, as on one host's
                                         shared memory)
     "topology": {"ranks_per_node": 8,
                  "intra": {"classes": [...]}, "inter": {"classes": [...]}}}

``classes`` (the flat network) is used when there is no topology, or when the run asks for
one rank per node. Profiles shipped with mpipar live in ``mpipar/comm/profiles/``; a name
(``dgx-h100``) or a path both load.
"""

from __future__ import annotations

import copy as _copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "local"  # measured on the development machine by ``bench calibrate``


@dataclass(frozen=True)
class SizeClass:
    max_bytes: int | None  # inclusive upper bound; None: no bound (the last class)
    alpha: float           # seconds per message that occupy the ports (LogGP's gap g)
    beta: float            # seconds per byte (occupy the ports too: LogGP's G)
    latency: float = 0.0   # seconds in flight that do not occupy a port (LogGP's L)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"max_bytes": self.max_bytes, "alpha_s": self.alpha,
                             "beta_s_per_byte": self.beta}
        if self.latency:
            d["latency_s"] = self.latency
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> "SizeClass":
        return SizeClass(d.get("max_bytes"), float(d["alpha_s"]), float(d["beta_s_per_byte"]),
                         float(d.get("latency_s", 0.0)))


@dataclass(frozen=True)
class Link:
    """One kind of link: size classes, sorted by ``max_bytes`` (the last one unbounded)."""

    classes: tuple[SizeClass, ...]

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("a link needs at least one size class")
        bounds = [c.max_bytes for c in self.classes]
        if bounds[-1] is not None or any(b is None for b in bounds[:-1]) or bounds[:-1] != sorted(bounds[:-1]):
            raise ValueError(f"size classes must be sorted with only the last unbounded, got {bounds}")

    def size_class(self, nbytes: int) -> SizeClass:
        """The class that prices a message of ``nbytes``."""
        for c in self.classes:
            if c.max_bytes is None or nbytes <= c.max_bytes:
                return c
        raise AssertionError("unreachable: the last class is unbounded")

    def params(self, nbytes: int) -> tuple[float, float]:
        """(alpha, beta) for a message of ``nbytes``."""
        c = self.size_class(nbytes)
        return c.alpha, c.beta

    def occupancy(self, nbytes: int) -> float:
        """Seconds a message of ``nbytes`` holds its ports: alpha + nbytes * beta."""
        c = self.size_class(nbytes)
        return c.alpha + nbytes * c.beta

    def latency(self, nbytes: int) -> float:
        """Seconds in flight beyond the ports (0 in a profile that gives none)."""
        return self.size_class(nbytes).latency

    def time(self, nbytes: int) -> float:
        """One message alone: alpha + latency + nbytes * beta."""
        c = self.size_class(nbytes)
        return c.alpha + c.latency + nbytes * c.beta

    @staticmethod
    def simple(alpha: float, beta: float) -> "Link":
        return Link((SizeClass(None, alpha, beta),))

    def to_json(self) -> dict[str, Any]:
        return {"classes": [c.to_json() for c in self.classes]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Link":
        if "classes" in d:
            return Link(tuple(SizeClass.from_json(c) for c in d["classes"]))
        return Link.simple(float(d["alpha_s"]), float(d["beta_s_per_byte"]))


def _local_time(link: Link | None, per_byte: float, nbytes: float) -> float:
    """A rank's own work on ``nbytes``: by the size classes of ``link`` when measured so (no
    bytes, no call), else ``per_byte`` each."""
    if link is not None:
        return link.time(nbytes) if nbytes > 0 else 0.0
    return per_byte * nbytes


# nccl-tests' bus-bandwidth factors (nccl-tests doc/PERFORMANCE.md): busbw = algbw * factor(p),
# algbw = bytes / seconds, bytes the whole buffer as mpipar counts it (allgather's output).
BUSBW_FACTOR: dict[str, Callable[[int], float]] = {
    "allreduce": lambda p: 2 * (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p, "allgather": lambda p: (p - 1) / p,
    "alltoall": lambda p: (p - 1) / p,
    "broadcast": lambda p: 1.0, "reduce": lambda p: 1.0,
}


@dataclass(frozen=True)
class BusbwTable:
    """One measured nccl-tests table: bytes -> bus bandwidth (bytes/s) for a group of
    ``nodes`` x ``ranks_per_node`` ranks. ``busbw(n)`` interpolates linearly in log(bytes);
    below the smallest size the time of the smallest size holds (a latency floor), above the
    largest its bandwidth."""

    ranks_per_node: int
    nodes: int
    points: tuple[tuple[int, float], ...]  # (bytes, busbw in bytes/s), by bytes
    source: str = ""

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError(f"a busbw table of {self.nodes} x {self.ranks_per_node} needs points")

    def busbw(self, nbytes: float) -> float:
        pts = self.points
        n0, b0 = pts[0]
        if nbytes <= n0:
            return b0 * nbytes / n0  # the smallest size's time: a floor
        for (na, ba), (nb, bb) in zip(pts, pts[1:]):
            if nbytes <= nb:
                w = math.log(nbytes / na) / math.log(nb / na)
                return ba + w * (bb - ba)
        return pts[-1][1]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ranks_per_node": self.ranks_per_node, "nodes": self.nodes,
                             "busbw_GBps": {str(n): b / 1e9 for n, b in self.points}}
        if self.source:
            d["source"] = self.source
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> "BusbwTable":
        pts = sorted((int(n), float(b) * 1e9) for n, b in d["busbw_GBps"].items())
        return BusbwTable(int(d["ranks_per_node"]), int(d["nodes"]), tuple(pts), d.get("source", ""))


@dataclass(frozen=True)
class NativeTables:
    """The cluster's own collectives (NCCL's, as nccl-tests measured them), by collective.

    A group of p ranks, at most ``per_node`` on any of its ``nodes`` nodes, is priced from the
    table of the nearest shape: one-node tables for a group inside a node, multi-node tables
    (nearest node count) otherwise. The table's busbw is taken as that shape's, and converted
    to seconds with the group's own factor (2(p-1)/p for all-reduce); across nodes, a group
    with fewer ranks per node than the table drives proportionally fewer NICs (one rail per
    rank), so its busbw is scaled by per_node / the table's ranks_per_node. A collective
    without a table of its own uses the all-reduce table's busbw (a ring moves each byte at
    the same rate in reduce-scatter, all-gather and all-reduce: an estimate)."""

    tables: dict[str, tuple[BusbwTable, ...]]

    def time(self, collective: str, nbytes: float, p: int, per_node: int, nodes: int) -> float:
        """Seconds for ``collective`` of ``nbytes`` over ``p`` ranks of that shape."""
        if p <= 1 or nbytes <= 0:
            return 0.0
        tables = self.tables.get(collective) or self.tables.get("allreduce")
        if not tables:
            raise ValueError(f"no native busbw table for {collective} (nor for allreduce)")
        same = [t for t in tables if (t.nodes == 1) == (nodes == 1)] or list(tables)
        table = min(same, key=lambda t: (abs(math.log(t.nodes / nodes)), abs(t.ranks_per_node - per_node)))
        bw = table.busbw(nbytes)
        if nodes > 1 and per_node < table.ranks_per_node:
            bw *= per_node / table.ranks_per_node
        return BUSBW_FACTOR[collective](p) * nbytes / bw

    def to_json(self) -> dict[str, Any]:
        return {c: [t.to_json() for t in ts] for c, ts in self.tables.items()}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "NativeTables":
        return NativeTables({c: tuple(BusbwTable.from_json(t) for t in ts) for c, ts in d.items()})


@dataclass
class Profile:
    name: str
    link: Link                       # the flat network (and the only one without topology)
    gamma: float = 0.0               # seconds per byte combined by reduce_local
    copy: float = 0.0                # seconds per byte of the Communicator's input copy
    reduce_link: Link | None = None  # reduce_local by size class (replaces gamma)
    copy_link: Link | None = None    # the input copy by size class (replaces copy)
    # A message sent while its sender receives nothing (one way) where that differs from an
    # exchange: on one host both directions of an exchange share the CPUs and the memory
    # bus, so a lone message can be much cheaper. Flat network only; None: same as ``link``.
    oneway_link: Link | None = None
    # The receiving CPU copies each message (MPI's shared-memory transport without
    # asynchronous progress): a transfer into a rank stalls while it computes, so a pipeline
    # cannot hide its reductions behind its incoming segments. False for a network that
    # moves data by itself (RDMA).
    transfers_need_cpu: bool = False
    post_overhead: float = 0.0       # seconds of a rank's time per isend/irecv it posts
    call_overhead: dict[str, float] = field(default_factory=dict)  # algorithm -> s per call
    eager_limit: int | None = None   # messages up to this go eagerly; None: all eager
    ranks_per_node: int | None = None
    intra: Link | None = None
    inter: Link | None = None
    # Rails: inter-node NICs per node (local rank i uses NIC i % nics_per_node, as on a DGX
    # where each GPU has its own) and ports per NIC (ranks sharing a NIC spread over them);
    # None: one NIC per rank. Each NIC port sends one message and receives one at a time.
    nics_per_node: int | None = None
    ports_per_nic: int = 1
    native: NativeTables | None = None  # algorithm="native" on the simulator, by busbw table
    metadata: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)  # kept for the compute model, unread here

    @staticmethod
    def simple(alpha: float, beta: float, gamma: float = 0.0, name: str = "simple",
               **kw: Any) -> "Profile":
        """A one-class flat network, as used by tests and the cost model's examples."""
        return Profile(name, Link.simple(alpha, beta), gamma, **kw)

    def reduce_time(self, nbytes: float) -> float:
        """Seconds for reduce_local to combine ``nbytes``."""
        return _local_time(self.reduce_link, self.gamma, nbytes)

    def copy_time(self, nbytes: float) -> float:
        """Seconds for the Communicator's copy of an ``nbytes`` input."""
        return _local_time(self.copy_link, self.copy, nbytes)

    def with_topology(self, ranks_per_node: int | None) -> "Profile":
        """This profile with ``ranks_per_node`` overridden (1 or None: flat)."""
        p = _copy.copy(self)
        p.ranks_per_node = ranks_per_node
        if ranks_per_node and ranks_per_node > 1 and (p.intra is None or p.inter is None):
            p.intra = p.intra or self.link
            p.inter = p.inter or self.link
        return p

    def levels(self, size: int) -> tuple[int, Link, Link]:
        """(ranks_per_node, intra link, inter link) for a run of ``size`` ranks; a flat
        network is one node per rank with every message on ``link``."""
        rpn = self.ranks_per_node or 1
        if rpn <= 1 or self.intra is None or self.inter is None:
            return 1, self.link, self.link
        return rpn, self.intra, self.inter

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "metadata": self.metadata,
                             "gamma_s_per_byte": self.gamma, "copy_s_per_byte": self.copy,
                             "eager_limit_bytes": self.eager_limit,
                             "classes": [c.to_json() for c in self.link.classes]}
        if self.post_overhead:
            d["post_overhead_s"] = self.post_overhead
        if self.call_overhead:
            d["call_overhead_s"] = dict(self.call_overhead)
        if self.reduce_link is not None:
            d["reduce"] = self.reduce_link.to_json()
        if self.copy_link is not None:
            d["copy"] = self.copy_link.to_json()
        if self.oneway_link is not None:
            d["oneway"] = self.oneway_link.to_json()
        if self.transfers_need_cpu:
            d["transfers_need_cpu"] = True
        if self.ranks_per_node and self.intra is not None and self.inter is not None:
            d["topology"] = {"ranks_per_node": self.ranks_per_node,
                             "intra": self.intra.to_json(), "inter": self.inter.to_json()}
            if self.nics_per_node:
                d["topology"]["nics_per_node"] = self.nics_per_node
            if self.ports_per_nic != 1:
                d["topology"]["ports_per_nic"] = self.ports_per_nic
        if self.native is not None:
            d["native"] = self.native.to_json()
        if self.compute:
            d["compute"] = self.compute
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Profile":
        topo = d.get("topology")
        link = Link(tuple(SizeClass.from_json(c) for c in d["classes"]))
        return Profile(
            name=d.get("name", "unnamed"), link=link, gamma=float(d.get("gamma_s_per_byte", 0.0)),
            copy=float(d.get("copy_s_per_byte", 0.0)),
            eager_limit=d.get("eager_limit_bytes"),
            reduce_link=Link.from_json(d["reduce"]) if d.get("reduce") else None,
            copy_link=Link.from_json(d["copy"]) if d.get("copy") else None,
            oneway_link=Link.from_json(d["oneway"]) if d.get("oneway") else None,
            transfers_need_cpu=bool(d.get("transfers_need_cpu", False)),
            post_overhead=float(d.get("post_overhead_s", 0.0)),
            call_overhead={k: float(v) for k, v in d.get("call_overhead_s", {}).items()},
            ranks_per_node=int(topo["ranks_per_node"]) if topo else None,
            intra=Link.from_json(topo["intra"]) if topo else None,
            inter=Link.from_json(topo["inter"]) if topo else None,
            nics_per_node=int(topo["nics_per_node"]) if topo and topo.get("nics_per_node") else None,
            ports_per_nic=int(topo.get("ports_per_nic", 1)) if topo else 1,
            native=NativeTables.from_json(d["native"]) if d.get("native") else None,
            metadata=dict(d.get("metadata", {})), compute=dict(d.get("compute", {})))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path | None = None) -> Profile:
    """A shipped profile by name (``dgx-h100``), or a JSON file by path; None: the default."""
    name = str(name_or_path or DEFAULT_PROFILE)
    path = Path(name)
    if not path.suffix and not path.exists():
        path = PROFILE_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no profile {name!r}: not a file, and not one of "
                                f"{', '.join(profile_names())} in {PROFILE_DIR}")
    return Profile.from_json(json.loads(path.read_text()))


class Network:
    """A profile laid over ``size`` ranks: per-message port occupancy and latency by level and
    size class, and the ports each rank's messages use.

    Rank r lives on node ``nodes[r]`` (default ``r // ranks_per_node``: consecutive ranks);
    its local rank is its index among the ranks of its node. Inside a node every rank has its
    own port (NVLink through a switch, or shared memory); between nodes a rank uses NIC
    ``local % nics_per_node`` of its node, and ranks sharing a NIC spread over its
    ``ports_per_nic`` ports (no ``nics_per_node``: one NIC per rank). ``nodes`` lets a group
    whose members sit on given nodes (a data-parallel group one rank per node, say) be
    simulated with the right levels and rails: ``Network(prof, 4, nodes=[0, 1, 2, 3])``.

    Lookups are cached per (level, size): a simulated collective sends few distinct sizes,
    and this sits on the simulator's hot path.
    """

    def __init__(self, profile: Profile, size: int, nic_serialization: bool = True,
                 nodes: list[int] | None = None) -> None:
        self.profile = profile
        self.size = size
        rpn, intra, inter = profile.levels(size)
        if nodes is not None:
            if len(nodes) != size:
                raise ValueError(f"nodes names {len(nodes)} ranks' nodes for a network of {size} ranks")
            if intra is inter and rpn == 1 and profile.intra is not None and profile.inter is not None:
                intra, inter = profile.intra, profile.inter
            self.node = [int(n) for n in nodes]
            rpn = max((self.node.count(n) for n in set(self.node)), default=1)
        else:
            self.node = [r // rpn for r in range(size)]
        # whether nodes are runs of ranks_per_node consecutive ranks (what hier assumes)
        self.consecutive = all(n == r // rpn for r, n in enumerate(self.node))
        self.ranks_per_node = rpn
        self.links = (intra, inter)
        seen: dict[int, int] = {}
        self.local = []
        for n in self.node:
            self.local.append(seen.get(n, 0))
            seen[n] = seen.get(n, 0) + 1
        # ports: level 0 one per rank; level 1 one per (node, NIC, port)
        nics = profile.nics_per_node
        ports = max(1, profile.ports_per_nic)
        self.port = (list(range(size)), self._nic_ports(nics, ports))
        self.ports = (size, 1 + max(self.port[1], default=0))
        flat = self.ranks_per_node == 1 and nodes is None
        # one-way messages priced apart: only on a flat network (every message on ``link``)
        self.oneway = profile.oneway_link if flat else None
        # like ``oneway``, a property of the one flat network it was measured on
        self.transfers_need_cpu = profile.transfers_need_cpu and flat
        self.gamma = profile.gamma
        self.reduce_link = profile.reduce_link  # None: gamma per byte
        self.post_overhead = profile.post_overhead
        self.eager_limit = math.inf if profile.eager_limit is None else profile.eager_limit
        self.nic_serialization = nic_serialization
        self._cache: tuple[dict[int, tuple[float, float]], ...] = ({}, {}, {})
        self._reduce_cache: dict[int, float] = {}

    def _nic_ports(self, nics: int | None, ports: int) -> list[int]:
        """Each rank's inter-node port index."""
        if not nics:
            return list(range(self.size))
        out = []
        for n, i in zip(self.node, self.local):
            nic, share = i % nics, i // nics
            out.append((n * nics + nic) * ports + share % ports)
        return out

    def level(self, src: int, dst: int) -> int:
        """0 inside a node, 1 between nodes."""
        return 0 if self.node[src] == self.node[dst] else 1

    def reduce_cost(self, nbytes: int) -> float:
        """Seconds to combine ``nbytes`` (reduce_local), cached per size."""
        c = self._reduce_cache.get(nbytes)
        if c is None:
            c = self._reduce_cache[nbytes] = self.profile.reduce_time(nbytes)
        return c

    def cost(self, level: int, nbytes: int) -> tuple[float, float]:
        """(port occupancy alpha + nbytes * beta, latency) on ``level``; level 2 is a one-way
        message of the flat network (``oneway``, when the profile has one)."""
        cache = self._cache[level]
        c = cache.get(nbytes)
        if c is None:
            link = self.oneway if level == 2 else self.links[level]
            k = link.size_class(nbytes)
            c = cache[nbytes] = (k.alpha + nbytes * k.beta, k.latency)
        return c

    def shape(self, granks: list[int]) -> tuple[int, int]:
        """(most ranks on one node, nodes) of a group of global ranks."""
        count: dict[int, int] = {}
        for g in granks:
            count[self.node[g]] = count.get(self.node[g], 0) + 1
        return max(count.values()), len(count)

    def native_time(self, collective: str, nbytes: float, p: int, per_node: int, nodes: int) -> float:
        """Seconds of the cluster's own ``collective`` over a group of ``p`` ranks, at most
        ``per_node`` on any of its ``nodes`` nodes (after the last member arrives): the
        profile's busbw tables (``NativeTables``), else, for a profile without any, the
        ring's closed form on the level the group spans (p - 1 or 2(p - 1) hops of nbytes / p,
        each alpha + latency + bytes * beta, and the reductions)."""
        if p <= 1 or nbytes <= 0:
            return 0.0
        if self.profile.native is not None:
            return self.profile.native.time(collective, nbytes, p, per_node, nodes)
        block = nbytes if collective in ("broadcast", "reduce") else nbytes / p
        hops = 2 * (p - 1) if collective == "allreduce" else p - 1
        reduces = p - 1 if collective in ("allreduce", "reduce_scatter", "reduce") else 0
        intra, inter = self.links
        if nodes == 1:
            hop = intra.time(int(block))
        else:  # k rings, one per rail: a NIC carries block / k, NVLink the other (k-1) / k
            k = max(1, min(per_node, self.profile.nics_per_node or 1))
            hop = max(inter.time(int(block / k)), intra.time(int(block * (k - 1) / k)) if k > 1 else 0.0)
        return hops * hop + reduces * self.reduce_cost(int(block))
