"""The rank grid: data x pipeline x tensor parallel groups, as data.

Ranks are laid out with tensor parallelism fastest, then data, then pipeline
(Megatron-LM's order), so that tensor-parallel ranks, which talk in every layer, are
adjacent and so share a node under the usual block placement of ranks on nodes::

    grid = arange(world).reshape(pp, dp, tp)
    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

Example, 8 ranks as dp=2, tp=2, pp=2::

    pp stage 0:  dp 0: [0 1]   dp 1: [2 3]      tp groups: [0 1] [2 3] [4 5] [6 7]
    pp stage 1:  dp 0: [4 5]   dp 1: [6 7]      dp groups: [0 2] [1 3] [4 6] [5 7]
                                                pp groups: [0 4] [1 5] [2 6] [3 7]

Each group is a Communicator made by ``split`` of the world, keeping its algorithm choice
(or one given per group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpipar.parallel.layout import Layout


def rank_grid(dp: int, tp: int, pp: int) -> np.ndarray:
    """World rank at [pp_rank, dp_rank, tp_rank]."""
    return np.arange(dp * tp * pp).reshape(pp, dp, tp)


def coordinates(rank: int, dp: int, tp: int, pp: int) -> tuple[int, int, int]:
    """(dp_rank, tp_rank, pp_rank) of a world rank."""
    pp_rank, rest = divmod(rank, dp * tp)
    dp_rank, tp_rank = divmod(rest, tp)
    return dp_rank, tp_rank, pp_rank


@dataclass
class Mesh:
    dp: int
    tp: int
    pp: int
    rank: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    world: Any
    dp_group: Any
    tp_group: Any
    pp_group: Any

    @property
    def grid(self) -> np.ndarray:
        return rank_grid(self.dp, self.tp, self.pp)

    def __str__(self) -> str:
        lines = [f"mesh dp={self.dp} x tp={self.tp} x pp={self.pp} ({self.dp * self.tp * self.pp} ranks; "
                 f"tensor-parallel ranks adjacent)"]
        grid = self.grid
        for s in range(self.pp):
            cells = "  ".join(f"dp{d}:{list(map(int, grid[s, d]))}" for d in range(self.dp))
            lines.append(f"  stage {s}: {cells}")
        return "\n".join(lines)


def make_mesh(world: Any, dp: int, tp: int, pp: int, algorithms: dict[str, str] | None = None) -> Mesh:
    """Split ``world`` (a Communicator) into dp, tp and pp groups.

    Checks the layout on every rank before any collective (``Layout.check``: a LayoutError),
    so a bad layout fails fast and identically everywhere. ``algorithms`` may give a
    collective algorithm per group, e.g. ``{"dp": "ring", "tp": "rhd"}``.
    """
    Layout(dp, tp, pp).check(world.size)
    dp_rank, tp_rank, pp_rank = coordinates(world.rank, dp, tp, pp)
    # color = the coordinates that stay fixed within the group; key = position in it
    tp_group = world.split(color=pp_rank * dp + dp_rank, key=tp_rank)
    dp_group = world.split(color=pp_rank * tp + tp_rank, key=dp_rank)
    pp_group = world.split(color=dp_rank * tp + tp_rank, key=pp_rank)
    for name, group in (("dp", dp_group), ("tp", tp_group), ("pp", pp_group)):
        group.name = name                          # what the trace calls its collectives
        if algorithms and name in algorithms:
            group.algorithm = algorithms[name]
    return Mesh(dp, tp, pp, world.rank, dp_rank, tp_rank, pp_rank, world, dp_group, tp_group, pp_group)
