import numpy as np
import pytest

import kvfold
from kvfold import _core

BACKENDS = kvfold.available_backends()
INITIAL = kvfold.simd_backend()


@pytest.fixture(params=BACKENDS, autouse=True)
def simd(request):
    """Every test runs once per SIMD backend this machine has."""
    _core._set_simd_backend(request.param)
    yield request.param
    _core._set_simd_backend(INITIAL)


def pytest_collection_modifyitems(config, items):
    """Tests marked one_backend (they exercise files, threads or memory, not the kernels) run once,
    with the best backend."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        skip = item.get_closest_marker("one_backend") and params.get("simd", BACKENDS[-1]) != BACKENDS[-1]
        (drop if skip else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def tokens(rng, B, H, T, d, dtype=np.float32):
    """(B, H, T, d) normal data."""
    return rng.standard_normal((B, H, T, d)).astype(dtype)
