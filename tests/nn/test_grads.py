"""GradStore: one flat buffer by default; once ZeRO-2 asks for buckets, storage per tensor,
created on first touch and freed when its bucket is taken."""

import numpy as np
import pytest

from mpipar.nn.flat import FlatLayout
from mpipar.nn.grads import GradStore

LAYOUT = FlatLayout([("a", (2, 3)), ("b", (4,)), ("c", (5,)), ("d", (1, 2))])   # 6, 4, 5, 2


def test_flat_mode_is_views_of_one_buffer():
    g = GradStore(LAYOUT, np.float64, np)
    assert g.buffer.shape == (17,) and not g.bucketed and len(g) == 4 and list(g) == list("abcd")
    g["b"] += 1.0
    assert np.array_equal(g.buffer[6:10], np.ones(4)) and g["c"].shape == (5,)
    assert g.get("nope") is None and g.allocated_bytes() == 17 * 8
    g.zero()
    assert not g.buffer.any()


def test_bucketed_tensors_are_created_zero_on_first_touch_and_freed_when_taken():
    g = GradStore(LAYOUT, np.float64, np)
    g["a"] += 3.0
    g.use_buckets([(10, 17), (0, 10)])             # index order need not be layout order
    assert g.buffer is None and g.bucketed and g.allocated_bytes() == 0
    g["c"] += np.arange(5)                          # only c is created, not its bucket
    assert g.allocated_bytes() == 5 * 8 and g.peak_bytes == 5 * 8
    g["b"][1] = 7.0
    assert not g["a"].any() and g["a"].shape == (2, 3)   # a fresh zero, not the old buffer
    assert g.peak_bytes == 15 * 8
    out = g.take(1)                                 # a and b: one contiguous copy
    assert out.flags.c_contiguous and np.array_equal(out, [0] * 6 + [0, 7, 0, 0])
    assert g.allocated_bytes() == 5 * 8 and g.peak_bytes == 15 * 8
    with pytest.raises(RuntimeError, match=r"gradient of b \(bucket 1, elements \[0, 10\)\) was "
                                           r"already handed"):
        g["b"]
    with pytest.raises(RuntimeError, match="already handed"):
        g.take(1)
    assert np.array_equal(g.take(0), [0, 1, 2, 3, 4, 0, 0])   # d never touched: zeros
    assert g.allocated_bytes() == 0
    g.zero()
    assert not g["b"].any() and g.allocated_bytes() == 4 * 8
    with pytest.raises(KeyError):
        g["nope"]


@pytest.mark.parametrize("ranges,match", [
    ([(0, 6), (6, 16)], "end at 16"),
    ([(0, 6), (7, 17)], "without gaps"),
    ([(0, 8), (8, 17)], "b .* split across"),
    ([(0, 6), (6, 6), (6, 17)], "without gaps"),
])
def test_bucket_ranges_must_tile_the_layout_in_whole_tensors(ranges, match):
    g = GradStore(LAYOUT, np.float32, np)
    with pytest.raises(ValueError, match=match):
        g.use_buckets(ranges)
    assert g.buffer is not None                    # refused: still the flat buffer
