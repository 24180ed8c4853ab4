"""Fixtures for the nn tests: ``xp`` is numpy always and cupy where a GPU is usable."""

import numpy as np
import pytest

from mpipar import backend


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    if request.param == "numpy":
        return np
    if not backend.cupy_available():
        pytest.skip("CuPy with a visible GPU is not available")
    return backend.get_xp("gpu")
