"""One model's forward and backward on several CPU threads, each on its share of the batch.

    from mpipar import backend
    from mpipar.nn.batch_threads import BatchThreads
    backend.set_cpu_threads(2)
    runner = BatchThreads(model)                       # model: a NumPy GPT
    loss, grads = runner.loss_and_grads(idx, targets)   # as model.loss_and_grads

Why: NumPy runs every elementwise pass on one thread, and OpenBLAS splits each matrix
product over its threads, which pays for itself only on large products; the attention's
(B, NH) small GEMMs and the softmax, GELU and layer-norm passes stay serial. A shakespeare
step (B=8, T=256) on 2 threads took 2.3 s that way against 1.4 s for PyTorch. Given threads
whole batch rows instead, the whole step is parallel, and every thread runs the one-thread
code: n replicas of the model (``GPT.replica``: the same parameter arrays, gradients and
caches of their own) each run forward and backward on contiguous rows, with BLAS and the
blocked chains on their own thread (``backend.one_thread_each``); NumPy releases the GIL
inside its loops and BLAS calls. Then the replicas' gradients are summed into the model's, in
replica order.

Maths: with shares of n_i of the B rows, loss = sum_i (n_i / B) loss_i, and each replica's
backward is scaled by n_i / B, so the gradient is that of the whole batch's mean loss. Sums
run in another order than on one thread (per share, then across shares), so results agree
with ``model.loss_and_grads`` to float rounding, not bitwise; they repeat bitwise for a given
thread count. With dropout each replica draws from its own generator (seeded from
``dropout_seed``), so its masks are not one thread's masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpipar.backend import cpu_threads, one_thread_each
from mpipar.nn.blocking import for_each_block, workers
from mpipar.nn.gpt import GPT


class BatchThreads:
    """Run ``model`` (a NumPy GPT) over the batch on ``backend.cpu_threads()`` threads."""

    def __init__(self, model: GPT, dropout_seed: int = 1 << 20) -> None:
        if model.xp is not np:
            raise ValueError("batch threads run NumPy models only (a GPU runs a batch as one)")
        if model.grad_buffer is None:
            raise ValueError("batch threads sum flat gradient buffers; this model's gradients "
                             "are in buckets")
        self.model = model
        self.dropout_seed = dropout_seed
        self.replicas: list[GPT] = [model]

    def _replicas(self, n: int) -> list[GPT]:
        """The model and n - 1 replicas (made once, kept for the next steps)."""
        while len(self.replicas) < n:
            self.replicas.append(self.model.replica(self.dropout_seed + len(self.replicas)))
        for r in self.replicas[1:n]:
            r.state.training = self.model.state.training
        return self.replicas[:n]

    def loss_and_grads(self, idx: Any, targets: Any, accumulate: bool = False,
                       dloss: float = 1.0) -> tuple[float, dict[str, Any]]:
        """As ``GPT.loss_and_grads``: the batch's mean loss and the model's ``grads``
        (accumulated into unless zeroed first), the rows split over the threads."""
        B = int(np.shape(idx)[0])
        n = min(cpu_threads(), B)
        if n == 1:
            return self.model.loss_and_grads(idx, targets, accumulate, dloss)
        bounds = [B * i // n for i in range(n + 1)]         # contiguous, sizes differ by <= 1
        replicas = self._replicas(n)

        def share(i: int) -> float:
            lo, hi = bounds[i], bounds[i + 1]
            loss, _ = replicas[i].loss_and_grads(idx[lo:hi], targets[lo:hi],
                                                 accumulate=accumulate and i == 0,
                                                 dloss=dloss * (hi - lo) / B)
            return loss * (hi - lo) / B

        with one_thread_each():
            losses = [f.result() for f in [workers(n).submit(share, i) for i in range(n)]]
        total = self.model.grad_buffer                       # (P,) flat
        others = [r.grad_buffer for r in replicas[1:]]

        def add(s: slice) -> None:
            for g in others:                                 # replica order: repeatable
                total[s] += g[s]

        for_each_block(np, total.shape[0], 1, add)           # on every thread, block by block
        return float(sum(losses)), self.model.grads
