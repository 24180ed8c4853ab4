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
from typing import Any

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "local"  # measured on the development machine by ``bench calibrate``


@dataclass(frozen=True)
class SizeClass:
    max_bytes: int | None  # inclusive upper bound; None: no bound (the last class)
    alpha: float           # seconds per message
    beta: float            # seconds per byte

    def to_json(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "alpha_s": self.alpha, "beta_s_per_byte": self.beta}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "SizeClass":
        return SizeClass(d.get("max_bytes"), float(d["alpha_s"]), float(d["beta_s_per_byte"]))


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

    def params(self, nbytes: int) -> tuple[float, float]:
        """(alpha, beta) for a message of ``nbytes``."""
        for c in self.classes:
            if c.max_bytes is None or nbytes <= c.max_bytes:
                return c.alpha, c.beta
        raise AssertionError("unreachable: the last class is unbounded")

    def time(self, nbytes: int) -> float:
        a, b = self.params(nbytes)
        return a + nbytes * b

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
    metadata: dict[str, Any] = field(default_factory=dict)

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
            metadata=dict(d.get("metadata", {})))

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
    """A profile laid over ``size`` ranks: per-message (alpha, beta) by level and size class.

    Rank r lives on node ``r // ranks_per_node``. Lookups are cached per (level, size): a
    simulated collective sends few distinct sizes, and this sits on the simulator's hot path.
    """

    def __init__(self, profile: Profile, size: int, nic_serialization: bool = True) -> None:
        self.profile = profile
        self.size = size
        self.ranks_per_node, intra, inter = profile.levels(size)
        self.links = (intra, inter)
        # one-way messages priced apart: only on a flat network (every message on ``link``)
        self.oneway = profile.oneway_link if self.ranks_per_node == 1 else None
        # like ``oneway``, a property of the one flat network it was measured on
        self.transfers_need_cpu = profile.transfers_need_cpu and self.ranks_per_node == 1
        self.gamma = profile.gamma
        self.reduce_link = profile.reduce_link  # None: gamma per byte
        self.post_overhead = profile.post_overhead
        self.eager_limit = math.inf if profile.eager_limit is None else profile.eager_limit
        self.nic_serialization = nic_serialization
        self._cache: tuple[dict[int, tuple[float, float]], ...] = ({}, {}, {})
        self._reduce_cache: dict[int, float] = {}

    def level(self, src: int, dst: int) -> int:
        """0 inside a node, 1 between nodes."""
        rpn = self.ranks_per_node
        return 0 if src // rpn == dst // rpn else 1

    def reduce_cost(self, nbytes: int) -> float:
        """Seconds to combine ``nbytes`` (reduce_local), cached per size."""
        c = self._reduce_cache.get(nbytes)
        if c is None:
            c = self._reduce_cache[nbytes] = self.profile.reduce_time(nbytes)
        return c

    def cost(self, level: int, nbytes: int) -> tuple[float, float]:
        """(alpha, nbytes * beta) on ``level``; level 2 is a one-way message of the flat
        network (``oneway``, when the profile has one)."""
        cache = self._cache[level]
        c = cache.get(nbytes)
        if c is None:
            link = self.oneway if level == 2 else self.links[level]
            a, b = link.params(nbytes)
            c = cache[nbytes] = (a, nbytes * b)
        return c
