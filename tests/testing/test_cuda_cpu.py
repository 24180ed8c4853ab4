"""The strict CuPy double's user kernels (mpipar/testing/cuda_cpu.py): CUDA C++ compiled for the
CPU behaves as CuPy's ElementwiseKernel and RawKernel do, refuses what it cannot run or what
would be wrong on a GPU, goes through the double's hazard model and counters, and without a
compiler is a clear error that the suite reports as a skip."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mpipar.testing import cuda_cpu
from mpipar.testing.cupy_double import HazardError

ROWSUM = r"""
extern "C" __global__ void rowsum(const double* __restrict__ x, double* out, long long rows, int n) {
  long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  double s = 0;
  for (int j = 0; j < n; j++) s += x[r * n + j];
  out[r] = s;
}
"""


def test_elementwise_broadcasts_types_and_scalars(strict_cupy):
    xp = strict_cupy.xp
    k = xp.ElementwiseKernel("T x, T y, float64 s", "T z", "z = x * y + (T)s", "axpb")
    x = xp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    y = xp.asarray(np.array([1, 2, 3], np.float32))
    z = k(x, y, 0.5)
    assert z.dtype == np.float32 and np.array_equal(z.get(), np.arange(6).reshape(2, 3) * [1, 2, 3] + 0.5)
    zt = k(x.T, xp.asarray(np.ones(2, np.float32)), 0.0)             # strided input
    assert np.array_equal(zt.get(), np.arange(6).reshape(2, 3).T)
    out = xp.zeros((2, 3), dtype=np.float32)
    assert k(x, y, 1.0, out) is out and out.get()[1, 2] == 5 * 3 + 1  # output given: in place


def test_elementwise_raw_params_index_and_several_outputs(strict_cupy):
    xp = strict_cupy.xp
    k = xp.ElementwiseKernel("raw T x", "T first, T rev",
                             "first = x[0] + _ind.size(); rev = x[x.size() - 1 - i]", "raw_index")
    x = xp.asarray(np.arange(5.0))
    first, rev = k(x, size=5)
    assert np.array_equal(rev.get(), [4, 3, 2, 1, 0]) and np.array_equal(first.get(), [5] * 5)
    inout = xp.ElementwiseKernel("T g", "T p", "p = p - g", "in_place_update")
    p = xp.asarray(np.ones(4))
    inout(xp.asarray(np.arange(4.0)), p)                             # reads its output
    assert np.array_equal(p.get(), [1, 0, -1, -2])


def test_elementwise_refusals(strict_cupy):
    xp = strict_cupy.xp
    k = xp.ElementwiseKernel("float32 x", "float32 y", "y = x", "copy32")
    with pytest.raises(TypeError, match="Wrong number of arguments"):
        k()
    with pytest.raises(TypeError, match="Unsupported type"):
        k(np.ones(3, np.float32))                                    # host memory
    with pytest.raises(TypeError, match="declared float32"):
        k(xp.asarray(np.ones(3)))                                    # float64 for float32
    with pytest.raises(ValueError, match="broadcast shape"):
        k(xp.asarray(np.ones(3, np.float32)), xp.zeros(4, dtype=np.float32))
    bad = xp.ElementwiseKernel("T x", "T y", "y = x +", "syntax_error")
    with pytest.raises(RuntimeError, match="does not compile"):
        bad(xp.asarray(np.ones(2)))


def test_raw_kernel_runs_every_thread_of_the_grid(strict_cupy):
    xp = strict_cupy.xp
    k = xp.RawKernel(ROWSUM, "rowsum")
    a = np.random.default_rng(0).standard_normal((37, 5))
    out = xp.empty(37, dtype=np.float64)
    k((3,), (16,), (xp.asarray(a), out, np.int64(37), np.int32(5)))  # 48 threads for 37 rows
    assert np.allclose(out.get(), a.sum(axis=1), rtol=1e-14)
    grid = xp.RawKernel(r"""
extern "C" __global__ void ids(int* out) {
  int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * (blockIdx.x + gridDim.x * blockIdx.y));
  out[t] = t;
}""", "ids")
    ids = xp.zeros(2 * 3 * 4 * 2, dtype=np.int32)
    grid((3, 2), (4, 2), (ids,))
    assert np.array_equal(ids.get(), np.arange(48))


def test_raw_kernel_refusals(strict_cupy):
    xp = strict_cupy.xp
    k = xp.RawKernel(ROWSUM, "rowsum")
    x, out = xp.asarray(np.ones((4, 3))), xp.empty(4, dtype=np.float64)
    with pytest.raises(TypeError, match="must be numpy.int64, got int"):
        k((1,), (4,), (x, out, 4, np.int32(3)))                      # a Python int
    with pytest.raises(TypeError, match="must be numpy.int32, got int64"):
        k((1,), (4,), (x, out, np.int64(4), np.int64(3)))
    with pytest.raises(TypeError, match="reads it as const double"):
        k((1,), (4,), (xp.asarray(np.ones((4, 3), np.float32)), out, np.int64(4), np.int32(3)))
    with pytest.raises(ValueError, match="not C-contiguous"):
        k((1,), (4,), (xp.asarray(np.ones((3, 4))).T, out, np.int64(4), np.int32(3)))
    with pytest.raises(ValueError, match="more than 1024 threads"):
        k((1,), (32, 33), (x, out, np.int64(4), np.int32(3)))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        k((1,), (4,), (x, out))
    with pytest.raises(ValueError, match="tuple of 1 to 3"):
        k(1, (4,), (x, out, np.int64(4), np.int32(3)))
    shared = xp.RawKernel('extern "C" __global__ void s(float* x) { __shared__ float t[32]; }', "s")
    with pytest.raises(NotImplementedError, match="__shared__"):
        shared((1,), (1,), (xp.zeros(1, dtype=np.float32),))
    with pytest.raises(ValueError, match="no __global__ void missing"):
        xp.RawKernel(ROWSUM, "missing")


def test_launches_are_counted_and_ordered_by_streams(strict_cupy):
    """One kernel per launch at the caller's line; reading an array another stream wrote,
    with no event wait, is a hazard, as for any kernel of the double."""
    xp = strict_cupy.xp
    k = xp.ElementwiseKernel("T x", "T y", "y = x * x", "square")
    x = xp.asarray(np.arange(3.0))
    with strict_cupy.counting() as c:
        k(x)
    assert c.total("kernels") == 1 and list(c.kernels)[0].startswith("tests/testing/test_cuda_cpu.py:")
    xp.cuda.get_current_stream().synchronize()
    side = xp.cuda.Stream()
    with side:
        y = k(x)                                                     # written on the side stream
    with pytest.raises(HazardError, match="no event wait"):
        k(y)
    xp.cuda.get_current_stream().wait_event(side.record())
    assert np.array_equal(k(y).get(), np.arange(3.0) ** 4)


def test_without_a_compiler_a_clear_error(strict_cupy, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cuda_cpu.compiler() is None
    k = strict_cupy.xp.ElementwiseKernel("T x", "T y", "y = x + (T)1234567", "never_compiled")
    with pytest.raises(cuda_cpu.CompilerMissing, match="'never_compiled'.*C\\+\\+ compiler"):
        k(strict_cupy.xp.asarray(np.ones(2)))


def test_the_suite_skips_kernel_tests_without_a_compiler(tmp_path):
    """A test that reaches a kernel with no compiler is reported as skipped (tests/conftest.py),
    not failed."""
    env = dict(os.environ, CXX="/nonexistent/c++", MPIPAR_KERNEL_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        "tests/test_kernels.py::test_gelu_matches_numpy"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 skipped" in r.stdout and "C++ compiler" in r.stdout, r.stdout[-2000:]
