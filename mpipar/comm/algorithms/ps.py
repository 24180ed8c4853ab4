"""Parameter server: every rank pushes its vector to the server(s), which reduce and send back.

With ``servers=K`` (ranks 0..K-1, default 1) the vector is cut into K shards and server k owns
shard k: every rank sends shard k to server k, server k folds the p contributions in rank order
(``x_0 op x_1 op ... op x_{p-1}``, its own taken in its turn) and sends the reduced shard to
every rank::

      push (K = 2, p = 4)                pull
      r0 r1 r2 r3 --shard 0--> s0        s0 --shard 0--> r0 r1 r2 r3
      r0 r1 r2 r3 --shard 1--> s1        s1 --shard 1--> r0 r1 r2 r3

Each shard is reduced once, by its server, and copied to the others: all ranks agree bit for
bit. A server receives into ``window`` reused scratch slots, not one buffer per rank.

Cost (p ranks, n bytes, K servers; alpha latency, beta per byte, gamma per reduced byte):
each server receives and sends (p-1) n/K bytes, so

    allreduce   2(p-1) alpha + 2(p-1)(n/K) beta + (p-1)(n/K) gamma

The server's link is the bottleneck (it grows with p), which is why data-parallel training
moved to all-reduce; with K = p it becomes a direct all-to-all reduce-scatter plus all-gather.
Li et al., "Scaling distributed machine learning with the parameter server", OSDI 2014.
"""

from __future__ import annotations

from typing import Any

from mpipar.comm.algorithms import Algorithm
from mpipar.comm.algorithms._util import give_scratch, split_offsets, take_scratch
from mpipar.comm.transport.base import Transport

TAG = 0x50  # 'P'
WINDOW = 4


def allreduce(t: Transport, buf: Any, op: Any, servers: int = 1, window: int = WINDOW) -> Any:
    p, r = t.size, t.rank
    if p == 1 or buf.size == 0:
        return buf
    k_servers = max(1, min(int(servers), p, buf.size))
    off = split_offsets(buf.size, k_servers)  # shared by all ranks (cached)
    shards = [(off[k], off[k + 1]) for k in range(k_servers)]
    # push my shard k to every server k other than me
    pushes = {k: t.isend(buf[a:b], k, TAG) for k, (a, b) in enumerate(shards) if k != r}
    pulls = []
    if r < k_servers:  # serve shard r: fold contributions in rank order
        a, b = shards[r]
        width = b - a
        mine = buf[a:b]
        others = [q for q in range(p) if q != r]
        window = max(1, min(window, len(others)))  # no more slots than senders
        scratch = take_scratch(t, buf, (window + (r != 0)) * width)
        slots = [scratch[w * width:(w + 1) * width] for w in range(window)]
        own = mine  # my own contribution, folded in its turn: kept aside unless I am rank 0
        if r != 0:
            own = scratch[window * width:]
            own[:] = mine
        reqs = [t.irecv(slots[i], others[i], TAG) for i in range(window)]
        i = 0
        for q in range(p):
            if q == r:
                contrib = own
            else:
                reqs[i].wait()
                contrib = slots[i % window]
            if q == 0:
                if contrib is not mine:
                    mine[:] = contrib  # the fold starts from rank 0's shard
            else:
                t.reduce_local(op, mine, contrib)
            if q != r:
                if i + window < len(others):
                    reqs.append(t.irecv(slots[i % window], others[i + window], TAG))
                i += 1
        give_scratch(t, scratch)  # every receive into it has been waited for
        pulls = [t.isend(mine, q, TAG + 1) for q in range(p) if q != r]
    # pull every other shard back into place
    for k, (a, b) in enumerate(shards):
        if k != r:
            pushes[k].wait()  # that region is still being pushed until this completes
            t.irecv(buf[a:b], k, TAG + 1).wait()
    for req in pulls:
        req.wait()
    return buf


ALGORITHM = Algorithm("ps", allreduce=allreduce)
