import numpy as np
import pytest

import kvfold
from kvfold import _core

BACKENDS = kvfold.available_backends()


@pytest.fixture(params=BACKENDS, autouse=True)
def simd(request):
    """Every test runs once per SIMD backend this machine has."""
    _core._set_simd_backend(request.param)
    yield request.param
    _core._set_simd_backend(BACKENDS[-1])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def tokens(rng, B, H, T, d, dtype=np.float32):
    """(B, H, T, d) normal data."""
    return rng.standard_normal((B, H, T, d)).astype(dtype)
