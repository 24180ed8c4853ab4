"""Hierarchical all-reduce: reduce within each node, all-reduce across node leaders, broadcast
within each node. Intra-node links are fast and inter-node links slow, so only one rank per
node puts bytes on the network.

Nodes come from, in order of preference: option ``ranks_per_node=N`` (consecutive ranks, so
the algorithm can be tested on one machine), a ``ranks_per_node`` attribute of the transport
(a simulated topology may provide one), or MPI's shared-memory split (``COMM_TYPE_SHARED``) when
the transport is an MPI one; otherwise all ranks form one node. The node leader is the lowest
rank of each node. The sub-groups are built once (``t.split``) and kept in ``t.cache``::

      node 0: r0 r1 r2 r3      node 1: r4 r5 r6 r7
      1. intra reduce   r1,r2,r3 -> r0          r5,r6,r7 -> r4     (``intra``, default tree)
      2. inter allreduce            r0 <----> r4                    (``inter``, default ring)
      3. intra broadcast r0 -> r1,r2,r3          r4 -> r5,r6,r7

The leaders' all-reduce gives them identical bits and the broadcast copies them, so every rank
agrees bit for bit; reduction order is fixed by the chosen algorithms.

Cost (N nodes of m ranks, n bytes; intra costs alpha_l, beta_l, inter alpha, beta), with the
default tree intra and ring inter::

    2 log m alpha_l + 2 log m n beta_l + log m n gamma            (unsegmented trees)
    + 2(N-1) alpha + 2((N-1)/N) n beta + ((N-1)/N) n gamma        (ring across leaders)

With ``rails=True`` every rank of a node puts bytes on the network, each on its own NIC (a
DGX's rails), instead of one leader: the node reduce-scatters (``intra`` must have
reduce_scatter and allgather: ring, rhd), rank i of every node all-reduces its block with
rank i of the other nodes (the rail group, ``inter``), and the node all-gathers::

      1. intra reduce-scatter: rank i of each node holds block i of its node's sum
      2. inter allreduce of block i among the ranks i of all nodes (N rail groups at once)
      3. intra allgather of the blocks

Rails need nodes of equal size (``ranks_per_node``, the option or the transport's, dividing
the group); otherwise ``rails=True`` falls back to the leaders' form above.

    cost ~ 2 (m-1)/m n beta_l + (m-1)/m n gamma + ring over N nodes on n/m bytes

As in Horovod's hierarchical all-reduce and NCCL's intra/inter-node split; the two-level idea
for SMP clusters: Sistare, vandeVaart and Loh, "Optimization of MPI collectives on clusters of
large-scale SMPs", SC 1999.
"""

from __future__ import annotations

from typing import Any

from mpipar.comm.algorithms import Algorithm, get_algorithm
from mpipar.comm.algorithms._util import accepted, split_counts
from mpipar.comm.transport.base import Transport


def node_of(t: Transport, ranks_per_node: int | None = None) -> int:
    """This rank's node, named after the node's lowest rank: from ``ranks_per_node`` (or the
    transport's own), else the transport's ``shared_node`` (MPI's shared-memory split;
    collective), else 0 (one node)."""
    rpn = ranks_per_node or getattr(t, "ranks_per_node", None)
    if rpn:
        return t.rank // int(rpn)
    shared_node = getattr(t, "shared_node", None)
    if shared_node is not None:
        return shared_node()  # one collective, at set-up time
    return 0


def groups(t: Transport, ranks_per_node: int | None = None) -> tuple[Transport, Transport | None]:
    """(this rank's node group, the leaders' group or None), built once per transport."""
    key = ("hier", ranks_per_node)
    found = t.cache.get(key)
    if found is None:
        node = node_of(t, ranks_per_node)
        local = t.split(node, t.rank)
        leaders = t.split(0 if local.rank == 0 else None, t.rank)
        found = t.cache[key] = (local, leaders)
    return found


def rail_groups(t: Transport, ranks_per_node: int | None = None) -> tuple[Transport, Transport]:
    """(this rank's node group, its rail group: local rank i of every node), built once."""
    key = ("hier-rails", ranks_per_node)
    found = t.cache.get(key)
    if found is None:
        local = t.split(node_of(t, ranks_per_node), t.rank)
        rail = t.split(local.rank, t.rank)
        found = t.cache[key] = (local, rail)
    return found


def _rails(t: Transport, buf: Any, op: Any, inter: str, intra: str, ranks_per_node: int | None,
           options: dict[str, Any]) -> Any:
    local, rail = rail_groups(t, ranks_per_node)
    inner, outer = get_algorithm(intra), get_algorithm(inter)
    if not (inner.supports("reduce_scatter") and inner.supports("allgather")):
        raise ValueError(f"hier rails=True: intra={intra!r} needs reduce_scatter and allgather")
    if not outer.supports("allreduce"):
        raise ValueError(f"hier: inter={inter!r} has no allreduce")
    counts = split_counts(buf.size, local.size)
    block = buf[:counts[0]] if local.size == 1 else \
        inner.reduce_scatter(local, buf, op, counts, **accepted(inner.reduce_scatter, options))
    if rail.size > 1 and block.size:
        block = outer.allreduce(rail, block, op, **accepted(outer.allreduce, options))
    if local.size == 1:
        buf[...] = block
        return buf
    return inner.allgather(local, block, counts, **accepted(inner.allgather, options))


def allreduce(t: Transport, buf: Any, op: Any, inter: str = "ring", intra: str = "tree",
              ranks_per_node: int | None = None, rails: bool = False, **options: Any) -> Any:
    """``options`` are passed on to the ``inter`` and ``intra`` algorithms that take them."""
    if t.size == 1 or buf.size == 0:
        return buf
    if inter == "hier" or intra == "hier":
        raise ValueError("hier cannot nest itself; choose inter/intra from the flat algorithms")
    rpn = ranks_per_node or getattr(t, "ranks_per_node", None)
    if rails and rpn and t.size % int(rpn) == 0:  # rails line up only on equal nodes
        return _rails(t, buf, op, inter, "ring" if intra == "tree" else intra, ranks_per_node, options)
    local, leaders = groups(t, ranks_per_node)
    inner, outer = get_algorithm(intra), get_algorithm(inter)
    if rails and not (inner.supports("reduce") and inner.supports("broadcast")):
        inner = get_algorithm("tree")  # the leaders' fallback of rails=True
    if not (inner.supports("reduce") and inner.supports("broadcast")):
        raise ValueError(f"hier: intra={intra!r} needs reduce and broadcast")
    if not outer.supports("allreduce"):
        raise ValueError(f"hier: inter={inter!r} has no allreduce")
    if local.size > 1:
        buf = inner.reduce(local, buf, op, 0, **accepted(inner.reduce, options))
    if leaders is not None and leaders.size > 1:
        buf = outer.allreduce(leaders, buf, op, **accepted(outer.allreduce, options))
    if local.size > 1:
        buf = inner.broadcast(local, buf, 0, **accepted(inner.broadcast, options))
    return buf


ALGORITHM = Algorithm("hier", allreduce=allreduce)
