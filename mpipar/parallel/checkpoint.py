"""Sharded checkpoints of a parallel run: what each rank owns and writes, collectively.

    path = save_sharded(root, step, trainer, run={...identity...}, keep=2)   # every rank
    # -> root/step-<step>, with root/latest naming it

No tensor is gathered: each rank writes one file (``data.ckpt_dir``'s format) with what it
is the canonical holder of (``model.owns``):

* parameters from dp rank 0 of each (tp, pp) position: its tensor-parallel shards, the
  tensors replicated over tp from tp rank 0 only, the tied wte from the first stage only;
* optimiser state the same way when it is replicated over dp (plain data parallelism), and
  from EVERY dp rank when it is sharded (ZeRO: each rank's pieces, ``GradSync.state_pieces``);
* gradient-compression state (``--compress`` other than none: each bucket's error-feedback
  residual, and PowerSGD's Q's) from EVERY rank, whole, as tensors of their own,
  ``compress.rank<R>.<bucket key>`` (R the world rank): the residuals differ per dp rank
  and belong to no global tensor. The manifest's ``compression`` (``compression_signature``,
  None without compression) says what they depend on, so that a resume restores them only
  under the same scheme, world and bucket layout (``mpipar.train`` refuses a resume where it
  differs, unless ``--resume-override compression`` starts them at zero).

So every element of every tensor is written exactly once, and the manifest says which slice
of which global tensor each file holds (``ckpt_dir`` module docstring). Loading under any
layout needs nothing from here: ``ckpt_dir.ShardedCheckpoint`` assembles one full tensor at a
time on access, and the trainer takes its slices (``model.local_pieces``) as it does from a
single file.

The protocol (every rank calls ``save_sharded``; all agree at each point, so a failure on
one rank is an error on all, and nothing is renamed into place unless every rank's part is
written):

1. every rank checks its tensors are finite; the ranks agree (the first non-finite tensor,
   by a global order, is named on all of them) and refuse before anything is written;
2. rank 0 creates ``root/.tmp-step-N-<random>`` exclusively and shares its name;
3. every rank writes its file exclusively, fsyncs it, and shares (file, SHA-256, pieces) or
   its error;
4. rank 0 writes the manifest, fsyncs, renames the directory to ``step-N``, points
   ``latest`` at it, deletes the oldest beyond ``keep``, and shares the outcome.

A shared file system is assumed: every rank sees ``root`` at the same path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.comm.compress import make_compressor
from mpipar.data import ckpt_dir
from mpipar.data.checkpoint import CheckpointError, array_sha256
from mpipar.parallel.model import Shard, owns


class NonFiniteStateError(CheckpointError):
    """A checkpoint refused because a tensor to save holds NaN or infinity."""


def _ranges(index: np.ndarray) -> list[list[int]]:
    """[[lo, hi), ...] runs of consecutive positions in ``index`` (a Shard's)."""
    idx = np.asarray(index, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return [[int(run[0]), int(run[-1]) + 1] for run in np.split(idx, breaks)]


def compression_signature(layout: Any, world_size: int) -> dict[str, Any] | None:
    """What a rank's compression state depends on: the scheme (as ``comm.compress`` parses
    it), the world, and the layout fields the local model and its buckets are cut by; None
    for ``none`` (no state). Equal signatures: the same keys and sizes on every rank."""
    if not layout.compressed:
        return None
    return {"scheme": make_compressor(layout.compress).spec, "world": int(world_size),
            "dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
            "virtual_stages": layout.virtual_stages,
            "stage_layers": None if layout.stage_layers is None else list(layout.stage_layers),
            "bucket_mb": layout.bucket_mb}


def compression_prefix(world_rank: int) -> str:
    """Where world rank ``world_rank``'s compression state sits among a checkpoint's
    ``compress.`` tensors."""
    return f"rank{world_rank}."


def compression_pieces(trainer: Any) -> list[tuple[dict[str, Any], Any]]:
    """(piece descriptor, array) of this rank's compression state: whole tensors of their
    own (module docstring)."""
    prefix = "compress." + compression_prefix(trainer.mesh.world.rank)
    return [({"key": prefix + k, "tensor": prefix + k, "axis": None, "ranges": None,
              "flat": None}, a) for k, a in trainer.sync.compression_state().items()]


def load_compression(trainer: Any, tensors: Mapping[str, Any]) -> None:
    """Give this rank's compression state from a checkpoint's ``compress.`` tensors
    (``ShardedCheckpoint.compression``) to ``trainer``; local, reads only this rank's."""
    prefix = compression_prefix(trainer.mesh.world.rank)
    trainer.sync.load_compression_state({k[len(prefix):]: np.asarray(tensors[k])
                                         for k in tensors if k.startswith(prefix)})


def owned_pieces(trainer: Any) -> list[tuple[dict[str, Any], Any]]:
    """(piece descriptor, array) for everything this rank is the canonical holder of (the
    module docstring); no communication."""
    local, sync = trainer.local, trainer.sync
    out = []

    def piece(tensor: str, spec: Shard | None, flat: tuple[int, int] | None) -> dict[str, Any]:
        key = tensor if flat is None else f"{tensor}[{flat[0]}:{flat[1]}]"
        return {"key": key, "tensor": tensor, "axis": None if spec is None else spec.axis,
                "ranges": None if spec is None else _ranges(spec.index),
                "flat": None if flat is None else [int(flat[0]), int(flat[1])]}

    for name, spec in local.shard_spec.items():
        if owns(local, name):
            out.append((piece(f"model.{name}", spec, None), local.params[name]))
    for s, held in sync.state_pieces().items():
        for name, flat, arr in held:
            if owns(local, name, every_dp_rank=not sync.state_replicated):
                out.append((piece(f"optim.{s}.{name}", local.shard_spec[name], flat), arr))
    return out + compression_pieces(trainer)


def tensor_table(trainer: Any) -> dict[str, dict[str, Any]]:
    """Every global tensor of a checkpoint of ``trainer``: key -> shape and dtype (the same
    on every rank, in the single process's order)."""
    local = trainer.local
    dtype = backend.compute_dtype(local.dtype).name     # 16-bit parameters saved as float32
    out = {f"model.{n}": {"shape": list(shape), "dtype": dtype}
           for n, shape in local.full_layout.shapes.items()}
    for s in trainer.sync.state_names:
        out.update({f"optim.{s}.{n}": {"shape": list(shape), "dtype": dtype}
                    for n, shape in local.full_layout.shapes.items()})
    return out


def _first_error(results: list[Any]) -> str | None:
    return next((r["error"] for r in results if r.get("error")), None)


def refuse_nonfinite(trainer: Any, step: int) -> None:
    """NonFiniteStateError on every rank, naming the first non-finite parameter or optimiser
    state tensor and its rank (``ParallelTrainer.nonfinite_state``), unless all are finite:
    the check before any checkpoint of ``step`` is written, sharded or exported. Collective."""
    report = trainer.nonfinite_state(step)
    if report is not None:
        raise NonFiniteStateError(f"{report}; the checkpoint of step {step} is not written")


def save_sharded(root: str, step: int, trainer: Any, run: Mapping[str, Any],
                 layout: Mapping[str, Any], keep: int) -> str:
    """Write a checkpoint of ``trainer`` at ``step`` to ``root/step-<step>`` (the protocol of
    the module docstring), with the run's identity ``run`` and ``layout`` in the manifest,
    keeping the newest ``keep``; returns the step directory. Collective over the world; a
    NonFiniteStateError or CheckpointError is raised on every rank alike, and then no new
    checkpoint is in place (the previous ones are untouched)."""
    world = trainer.mesh.world
    tensors = tensor_table(trainer)
    order = {k: i for i, k in enumerate(tensors)}
    pieces = owned_pieces(trainer)
    host = [(p, np.ascontiguousarray(backend.to_host(a)).astype(backend.compute_dtype(a.dtype),
                                                                  copy=False)) for p, a in pieces]

    # 1. nothing non-finite is ever written: all ranks agree on the first bad tensor
    refuse_nonfinite(trainer, step)

    # 2. rank 0 makes the temporary directory; everyone learns its name or the error
    tmp, error = None, None
    if world.rank == 0:
        try:
            tmp = ckpt_dir.create_temp_dir(root, step)
        except (OSError, CheckpointError) as e:
            error = f"{root}: cannot create a temporary directory for step {step} ({e})"
    tmp, error = world.allgather_json([tmp, error])[0]
    if error:
        raise CheckpointError(error)

    # 3. every rank writes what it holds
    mine: dict[str, Any] = {"file": None, "error": None}
    if host:
        fname = ckpt_dir.shard_file_name(world.rank)
        try:
            info = ckpt_dir.write_shard_file(os.path.join(tmp, fname),
                                             {p["key"]: a for p, a in host})
            recorded = [{**p, "sha256": array_sha256(a)} for p, a in host]
            # this rank's own tensors (its compression state): only it knows their sizes
            own = {p["tensor"]: {"shape": list(a.shape), "dtype": a.dtype.name}
                   for p, a in host if p["tensor"].startswith("compress.")}
            mine = {"file": fname, **info, "pieces": recorded, "tensors": own, "error": None}
        except OSError as e:
            mine["error"] = f"rank {world.rank} could not write {os.path.join(tmp, fname)} ({e})"
    results = world.allgather_json(mine)
    error = _first_error(results)

    # 4. rank 0 commits
    final = os.path.join(root, f"step-{step}")
    if world.rank == 0:
        if error is None:
            scalars = trainer.scaler.state_dict()     # fp16's loss scale; {} otherwise
            for r in results:
                tensors.update(r.get("tensors", {}))
            manifest = {"format": ckpt_dir.FORMAT, "version": ckpt_dir.VERSION, "step": int(step),
                        "optim_step": int(trainer.sync.step_count), "run": dict(run),
                        **({"optim_scalars": scalars} if scalars else {}),
                        "layout": dict(layout), "tensors": tensors,
                        "compression": compression_signature(trainer.layout, world.size),
                        "files": {r["file"]: {"sha256": r["sha256"], "bytes": r["bytes"],
                                              "pieces": r["pieces"]}
                                  for r in results if r["file"]}}
            try:
                final = ckpt_dir.commit(tmp, root, step, manifest)
                ckpt_dir.prune(root, keep)
            except OSError as e:
                error = f"{root}: could not complete the checkpoint of step {step} ({e})"
        if error is not None:
            ckpt_dir.remove_path(tmp)
    error = world.allgather_json(error)[0]
    if error:
        raise CheckpointError(f"checkpoint of step {step} not written: {error}")
    return final
