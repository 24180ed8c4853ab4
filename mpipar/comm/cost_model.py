"""Closed-form alpha-beta-gamma costs of the collective algorithms, for ``auto`` and for checking
the simulator.

The model is the simulator's (see ``transport/sim.py``): a message of b bytes costs
``m(b) = alpha(b) + b * beta(b)`` (alpha and beta from the profile's size class for b), each
rank has one send port and one receive port (single-port, full duplex), so messages a rank
sends one after another cost m(b) each; combining b bytes costs ``b * gamma`` (``reduce(b)`` in
code, ``Net.reduce``: a profile may give reductions size classes, as it does messages). Notation:
p ranks, n bytes, k = log2 p, b = n / p.

    ring    allreduce       (p-1) (2 m(b) + b gamma)
            reduce_scatter  (p-1) (m(b) + b gamma)
            allgather       (p-1) m(b)
            broadcast       (p-1 + c-1) m(n/c)                   chain of c chunks
    rhd     allreduce       sum_{i=1..k} (2 m(n/2^i) + (n/2^i) gamma)   = 2k alpha + 2 (p-1)/p n beta
                                                                  + (p-1)/p n gamma (one class)
            small messages  k (m(n) + n gamma)                    recursive doubling
            p not 2^k       + 2 m(n) + n gamma                    fold and unfold
    tree    reduce          k (m(n) + n gamma)                    binomial, one segment
            broadcast       k m(n)                                largest subtree first
            allreduce       k (m(n) + n gamma) + k m(n)           reduce, then a broadcast sent
                                                                  to the largest subtree first
            s segments      estimates: fill + (s-1) x the root's period (see tree_allreduce)
    ps      allreduce       max(m + (p-1) n gamma, (p-1) m + n gamma) + (p-1) m,  m = m(n)
                            (one server: p-1 pushes queue at its port, folds overlap them)
    dbtree  allreduce       ~ 2d (2m + g) + 4 (s-1)(2m + g), m = m(n/2s), g = (n/2s) gamma,
                            d = k + 1, s segments per half                 (estimate)
    hier    allreduce       tree reduce (intra) + ring allreduce (inter, N nodes) + tree
                            broadcast (intra), each with its own level's alpha and beta

``exact(...)`` says when a formula is exactly what the simulator computes (the cost-model
test checks those to 1e-9): p a power of two (rhd, tree, hier's node size), counts divisible
by p, one segment or chunk per block, a flat network or a hier run on its own topology.
Elsewhere they are estimates: uneven blocks (the largest block sets the pace), pipelined
segments (fill and drain plus per-segment port contention), and the in-port booking order.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

from mpipar.comm.algorithms import dbtree, rhd, ring, tree
from mpipar.comm.network import Network, load_profile

# The algorithms' own defaults (``ring.CHUNK_BYTES``, ``rhd.SMALL_BYTES``, ``tree.SEGMENT_BYTES``,
# ``dbtree.SEGMENT_BYTES``) are read from their modules at each call, so the formulas follow
# the code when a default changes.
_SEGMENTED = {"tree": tree, "dbtree": dbtree}


def _chunk(p: int, chunk_bytes: int | None) -> float:
    """ring's chunk: its default is 1 MiB for p > 2 and no chunking for p = 2."""
    if chunk_bytes is not None:
        return chunk_bytes
    return ring.CHUNK_BYTES if p > 2 else math.inf


def _seg(algorithm: str, segment_bytes: int | None) -> int:
    return segment_bytes or _SEGMENTED[algorithm].SEGMENT_BYTES

ALGORITHMS = ("ring", "rhd", "tree", "dbtree", "ps", "hier")
COSTED: dict[str, tuple[str, ...]] = {
    "allreduce": ("ring", "rhd", "tree", "dbtree", "ps", "hier"),
    "reduce_scatter": ("ring", "rhd"),
    "allgather": ("ring", "rhd"),
    "broadcast": ("ring", "tree"),
    "reduce": ("tree",),
}


@dataclass(frozen=True)
class Net:
    """Per-message time on each level, the time to combine b bytes, and the node size (1: a
    flat network)."""

    intra: Callable[[int], float]
    inter: Callable[[int], float]
    reduce: Callable[[float], float]
    ranks_per_node: int = 1

    @staticmethod
    def from_profile(profile: Any, ranks_per_node: int | None = None) -> "Net":
        if ranks_per_node is not None:
            profile = profile.with_topology(ranks_per_node)
        rpn, intra, inter = profile.levels(0)
        return Net(intra.time, inter.time, profile.reduce_time, rpn)

    @staticmethod
    def simple(alpha: float, beta: float, gamma: float = 0.0) -> "Net":
        def m(b: int) -> float:
            return alpha + b * beta

        def g(b: float) -> float:
            return b * gamma
        return Net(m, m, g, 1)

    def m(self, nbytes: float, p: int) -> float:
        """A message of a flat algorithm over p ranks whose steps all cross nodes once p
        spans nodes (a ring: every step waits for its slowest, inter-node, hop)."""
        return (self.intra if p <= self.ranks_per_node else self.inter)(int(nbytes))

    def m_dist(self, nbytes: float, distance: int) -> float:
        """A message between ranks ``distance`` apart (power-of-two partners, aligned nodes of
        a power-of-two size): inside a node when distance < ranks_per_node."""
        return (self.intra if distance < self.ranks_per_node else self.inter)(int(nbytes))


def _log2(p: int) -> int:
    return (p - 1).bit_length()


def _pof2(p: int) -> bool:
    return p & (p - 1) == 0


# -- ring ---------------------------------------------------------------------------------------
def ring_allreduce(p: int, n: float, net: Net, channels: int = 1) -> float:
    b = math.ceil(n / p)
    if channels > 1:  # k rings, each hop waits for its slowest port (estimate)
        k = channels
        rpn = min(p, net.ranks_per_node)
        if p > rpn:  # one ring per rail leaves each node: a NIC carries b/k, NVLink the rest
            hop = max(net.inter(int(b / k)), net.intra(int(b * (k - 1) / k)) if rpn > 1 else 0.0)
        else:
            hop = net.intra(int(b))
        return (p - 1) * (2 * hop + max(net.reduce(b / k), 0.0) * 1)
    return (p - 1) * (2 * net.m(b, p) + net.reduce(b))


def ring_reduce_scatter(p: int, n: float, net: Net) -> float:
    b = math.ceil(n / p)
    return (p - 1) * (net.m(b, p) + net.reduce(b))


def ring_allgather(p: int, n: float, net: Net) -> float:
    return (p - 1) * net.m(math.ceil(n / p), p)


def ring_broadcast(p: int, n: float, net: Net, chunk_bytes: int | None = None) -> float:
    c = max(1, math.ceil(n / (chunk_bytes or ring.CHUNK_BYTES)))
    return (p - 1 + c - 1) * net.m(math.ceil(n / c), p)


# -- recursive halving / doubling ---------------------------------------------------------------
def rhd_allreduce(p: int, n: float, net: Net, small_bytes: int | None = None,
                  itemsize: int = 4) -> float:
    small_bytes = small_bytes or rhd.SMALL_BYTES
    k = p.bit_length() - 1  # log2 of the power-of-two core
    pof2 = 1 << k
    extra = 0.0 if p == pof2 else 2 * net.m(n, p) + net.reduce(n)
    if n < small_bytes or n / itemsize < pof2:  # doubling: partners 1, 2, 4 ... apart
        return extra + sum(net.m_dist(n, 1 << i) + net.reduce(n) for i in range(k))
    t = 0.0
    for i in range(1, k + 1):  # halving with partners pof2/2^i apart, doubling the same back
        part = n / (1 << i)
        t += 2 * net.m_dist(part, pof2 >> i) + net.reduce(part)
    return extra + t


def rhd_reduce_scatter(p: int, n: float, net: Net) -> float:
    k = p.bit_length() - 1
    extra = 0.0 if p == 1 << k else 2 * net.m(n, p) + net.reduce(n)
    pof2 = 1 << k
    return extra + sum(net.m_dist(n / (1 << i), pof2 >> i) + net.reduce(n / (1 << i))
                       for i in range(1, k + 1))


def rhd_allgather(p: int, n: float, net: Net) -> float:
    k = p.bit_length() - 1
    extra = 0.0 if p == 1 << k else 2 * net.m(n, p)
    pof2 = 1 << k
    return extra + sum(net.m_dist(n / (1 << i), pof2 >> i) for i in range(1, k + 1))


# -- binomial tree ------------------------------------------------------------------------------
def _segments(n: float, segment_bytes: int) -> int:
    return max(1, math.ceil(n / segment_bytes))


def _kids_m(k: int, seg: float, net: Net) -> float:
    """Time for the root's k children (1, 2, 4 ... apart) to deliver one segment each."""
    return sum(net.m_dist(seg, 1 << j) for j in range(k))


def tree_reduce(p: int, n: float, net: Net, segment_bytes: int | None = None) -> float:
    k, s = _log2(p), _segments(n, _seg("tree", segment_bytes))
    seg = n / s
    if s == 1:  # k levels of (message + fold); the deepest path is the root's last child
        return sum(net.m_dist(n, 1 << j) + net.reduce(n) for j in range(k))
    # pipelined (estimate): a fill of k levels, then one segment per period, the period being
    # the root's k children delivering through its one receive port (folds hidden if faster)
    period = max(_kids_m(k, seg, net), k * net.reduce(seg))
    return k * (net.m(seg, p) + net.reduce(seg)) + (s - 1) * period


def tree_broadcast(p: int, n: float, net: Net, segment_bytes: int | None = None,
                   largest_first: bool = True) -> float:
    k, s = _log2(p), _segments(n, _seg("tree", segment_bytes))
    seg = n / s
    if s == 1:
        if largest_first:  # every path is k messages long
            return sum(net.m_dist(n, 1 << j) for j in range(k))
        # smallest subtree first: the child 2^j apart waits for j earlier sends of the root
        # and then broadcasts to its own subtree: B(k) = max_j (sum_{i<=j} m_i + B(j))
        b = [0.0]
        for kk in range(1, k + 1):
            b.append(max(sum(net.m_dist(n, 1 << i) for i in range(j + 1)) + b[j] for j in range(kk)))
        return b[k]
    return k * net.m(seg, p) + (s - 1) * _kids_m(k, seg, net)  # estimate, as tree_reduce


def tree_allreduce(p: int, n: float, net: Net, segment_bytes: int | None = None) -> float:
    segment_bytes = _seg("tree", segment_bytes)
    s = _segments(n, segment_bytes)
    if s == 1:
        return tree_reduce(p, n, net, segment_bytes) + tree_broadcast(p, n, net, segment_bytes)
    # pipelined (estimate): each loop iteration of _treepipe waits for its reduce step and
    # then for its broadcast step, in program order, so the root's period is its k receives
    # plus its k sends (not the max of the two ports), after a fill of 2k levels
    k, seg = _log2(p), n / s
    period = 2 * max(_kids_m(k, seg, net), k * net.reduce(seg))
    return 2 * k * (net.m(seg, p) + net.reduce(seg)) + (s - 1) * period


# -- double binary tree (estimate) --------------------------------------------------------------
def dbtree_allreduce(p: int, n: float, net: Net, segment_bytes: int | None = None) -> float:
    d = _log2(p) + 1
    half = n / 2
    s = _segments(half, _seg("dbtree", segment_bytes))
    seg = half / s
    # each tree: d levels up and down, s segments. A rank interior in one tree and a leaf in
    # the other moves 4 segments through each port per step (2 children + parent, 1 parent
    # in the other tree), and, as for tree, the up and down waits of a step are serial: a
    # period of 8 messages. Still optimistic at large p and many segments (the window of 2
    # posted receives makes the pipeline latency-bound): 1.0-2.7x below the simulator in
    # tests/sim; prefer the simulator or a tuned table for dbtree.
    step = 2 * net.m(seg, p) + net.reduce(seg)
    return 2 * d * step + (s - 1) * 4 * step


# -- parameter server ---------------------------------------------------------------------------
def ps_allreduce(p: int, n: float, net: Net, servers: int = 1) -> float:
    k = max(1, min(servers, p))
    shard = n / k
    near = min(p, net.ranks_per_node) - 1  # the server's node mates come over the fast link
    total = near * net.intra(int(shard)) + (p - 1 - near) * net.inter(int(shard))
    m = total / (p - 1)
    fold = net.reduce(shard)
    push = max(m + (p - 1) * fold, total + fold)
    if k > 1:  # every rank also pushes k-1 shards through its own port (estimate)
        push = max(push, (k - 1) * m + fold)
    return push + total


# -- hierarchical -------------------------------------------------------------------------------
def hier_allreduce(p: int, n: float, net: Net, ranks_per_node: int | None = None,
                   inter: str = "ring", intra: str = "tree", **options: Any) -> float:
    rpn = ranks_per_node or net.ranks_per_node
    rpn = max(1, min(rpn, p))
    nodes = math.ceil(p / rpn)
    local = Net(net.intra, net.intra, net.reduce, rpn)
    across = Net(net.inter, net.inter, net.reduce, 1)
    t = 0.0
    if rpn > 1:
        seg = options.get("segment_bytes")
        if intra == "tree":
            t += tree_reduce(rpn, n, local, seg) + tree_broadcast(rpn, n, local, seg)
        else:  # any other intra algorithm: its all-reduce as an estimate
            t += predict(intra, "allreduce", rpn, n, net=local)
    if nodes > 1:
        t += predict(inter, "allreduce", nodes, n, net=across,
                     **{k: v for k, v in options.items() if k != "segment_bytes"})
    return t


_FORMULAS: dict[tuple[str, str], Callable[..., float]] = {
    ("ring", "allreduce"): ring_allreduce, ("ring", "reduce_scatter"): ring_reduce_scatter,
    ("ring", "allgather"): ring_allgather, ("ring", "broadcast"): ring_broadcast,
    ("rhd", "allreduce"): rhd_allreduce, ("rhd", "reduce_scatter"): rhd_reduce_scatter,
    ("rhd", "allgather"): rhd_allgather,
    ("tree", "reduce"): tree_reduce, ("tree", "broadcast"): tree_broadcast,
    ("tree", "allreduce"): tree_allreduce,
    ("dbtree", "allreduce"): dbtree_allreduce, ("ps", "allreduce"): ps_allreduce,
    ("hier", "allreduce"): hier_allreduce,
}

_OPTION_NAMES = {"chunk_bytes", "channels", "small_bytes", "segment_bytes", "servers", "ranks_per_node",
                 "inter", "intra", "itemsize"}


def native(collective: str, p: int, nbytes: float, profile: Any, ranks_per_node: int | None = None) -> float:
    """The cluster's own collective, as the simulator prices it (``Network.native_time``:
    the profile's busbw tables, else the ring estimate), for p consecutive ranks."""
    prof = profile if hasattr(profile, "levels") else load_profile(profile)
    if ranks_per_node is not None:
        prof = prof.with_topology(ranks_per_node)
    rpn = max(1, min(p, prof.levels(p)[0]))
    return Network(prof, p).native_time(collective, nbytes, p, rpn, math.ceil(p / rpn))


def predict(algorithm: str, collective: str, p: int, nbytes: float, profile: Any = None,
            net: Net | None = None, **options: Any) -> float:
    """Predicted seconds of ``collective`` by ``algorithm`` over ``p`` ranks for ``nbytes``
    (the whole buffer, as nccl-tests counts it). ``profile``: a Profile, a name or path (None:
    the default profile); ``options``: the algorithm's (``servers``, ``segment_bytes`` ...).
    With a profile (not a bare ``net``) the time includes, as the simulator's does, the
    profile's per-call overhead of the algorithm and the Communicator's input copy;
    ``algorithm="native"`` is the profile's busbw tables."""
    if p <= 1 or nbytes <= 0:
        return 0.0
    prof = None
    if net is None:
        prof = profile if hasattr(profile, "levels") else load_profile(profile)
    if algorithm == "native":
        if prof is None:
            raise ValueError("native needs a profile (its busbw tables), not a bare Net")
        return native(collective, p, nbytes, prof, options.get("ranks_per_node")) \
            + prof.call_overhead.get("native", 0.0) + prof.copy_time(nbytes)
    fn = _FORMULAS.get((algorithm, collective))
    if fn is None:
        raise ValueError(f"no cost formula for {algorithm} {collective}")
    fixed = 0.0
    if net is None:
        net = Net.from_profile(prof, options.get("ranks_per_node"))
        fixed = prof.call_overhead.get(algorithm, 0.0) + prof.copy_time(
            nbytes / p if collective == "allgather" else nbytes)
    names = set(inspect.signature(fn).parameters)
    kw = {k: v for k, v in options.items() if k in names or ("options" in names and k in _OPTION_NAMES)}
    if algorithm == "ring" and collective == "broadcast":
        kw = {k: v for k, v in kw.items() if k == "chunk_bytes"}
    return fn(p, nbytes, net, **kw) + fixed


def algorithms_for(collective: str) -> tuple[str, ...]:
    return COSTED.get(collective, ())


def exact(algorithm: str, collective: str, p: int, nbytes: int, itemsize: int = 4,
          **options: Any) -> bool:
    """True where ``predict`` is exactly the simulator's time on a flat one-class network
    (or, for hier, on its own two-level topology)."""
    count = nbytes // itemsize
    pof2 = _pof2(p)
    if algorithm == "ring":
        if options.get("channels", 1) > 1:
            return False
        if collective == "broadcast":
            return True
        return count % p == 0 and nbytes // p <= _chunk(p, options.get("chunk_bytes"))
    if algorithm == "rhd":
        return pof2 and count % p == 0
    if algorithm == "tree":
        return pof2 and nbytes <= _seg("tree", options.get("segment_bytes"))
    if algorithm == "ps":
        return options.get("servers", 1) == 1
    if algorithm == "hier":
        rpn = options.get("ranks_per_node") or 1
        nodes = p // rpn
        return (p % rpn == 0 and _pof2(rpn) and count % nodes == 0
                and nbytes <= _seg("tree", options.get("segment_bytes"))
                and nbytes // nodes <= _chunk(nodes, options.get("chunk_bytes")))
    return False
