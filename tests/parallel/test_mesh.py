"""The rank grid: group membership for every layout that fits the world, and clear errors."""

import numpy as np
import pytest

from mpipar.parallel.layout import Layout, LayoutError, layouts
from mpipar.parallel.mesh import coordinates, make_mesh, rank_grid


def test_grid_matches_coordinates():
    for dp, tp, pp in layouts(8):
        grid = rank_grid(dp, tp, pp)
        for r in range(8):
            d, t, p = coordinates(r, dp, tp, pp)
            assert grid[p, d, t] == r


def test_layouts_of_8_and_6():
    assert (2, 2, 2) in layouts(8) and (8, 1, 1) in layouts(8) and len(layouts(8)) == 10
    assert all(d * t * p == 6 for d, t, p in layouts(6)) and len(layouts(6)) == 9


@pytest.mark.parametrize("bad,field", [((3, 1, 1), "grid"), ((2, 2, 3), "grid"), ((0, 8, 1), "dp"),
                                       ((-1, -8, 1), "dp"), ((2, 0, 4), "tp"), ((2, 2, 2.0), "pp")])
def test_bad_layout_is_a_clear_error(bad, field):
    with pytest.raises(LayoutError, match="world of 8 ranks|positive integer") as e:
        Layout(*bad).check(8)
    assert e.value.field == field


@pytest.mark.mpi(min_size=1)
def test_groups_for_every_layout(comm):
    for dp, tp, pp in layouts(comm.size):
        mesh = make_mesh(comm, dp, tp, pp)
        grid = rank_grid(dp, tp, pp)
        # each group's members, ordered by group rank, are the grid's line through this rank
        members = {
            "tp": list(grid[mesh.pp_rank, mesh.dp_rank, :]),
            "dp": list(grid[mesh.pp_rank, :, mesh.tp_rank]),
            "pp": list(grid[:, mesh.dp_rank, mesh.tp_rank]),
        }
        for name, group in (("tp", mesh.tp_group), ("dp", mesh.dp_group), ("pp", mesh.pp_group)):
            got = group.allgather(np.array([comm.rank]))
            assert list(got) == members[name], (name, dp, tp, pp)
        assert (mesh.dp_group.rank, mesh.tp_group.rank, mesh.pp_group.rank) == (mesh.dp_rank, mesh.tp_rank, mesh.pp_rank)
        assert "mesh dp=" in str(mesh)


@pytest.mark.mpi(min_size=2)
def test_layout_not_fitting_world_fails_on_every_rank_before_communicating(comm):
    with pytest.raises(LayoutError, match=f"world of {comm.size} ranks"):
        make_mesh(comm, comm.size + 1, 1, 1)
    comm.barrier()  # every rank got here: nobody was left waiting in a collective
