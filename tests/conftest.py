import numpy as np
import pytest
from numpy.testing import assert_allclose

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


# Cache shapes (batch, KV heads, query heads, d_k, d_v, window, sinks): odd sizes, grouped queries,
# windows and sinks.
SHAPES = [
    (1, 1, 1, 1, 1, 0, 0),
    (2, 3, 3, 7, 5, 0, 0),
    (1, 2, 6, 17, 3, 4, 0),
    (3, 1, 4, 3, 33, 0, 2),
    (2, 2, 4, 33, 7, 5, 3),
    (1, 1, 1, 127, 17, 1, 1),
]


def make_cache(rule, shape, cls=kvfold.MemoryCache, **kw):
    """A cache of ``shape`` (kvfold's, or a reference model's with ``cls``)."""
    B, H, Hq, dk, dv, window, sinks = shape
    return cls(
        rule, num_heads=H, head_dim=dk, value_dim=dv, num_query_heads=Hq, batch_size=B, window=window, sinks=sinks, **kw
    )


def shape_tokens(rng, shape, T):
    """q (B, Hq, T, d_k), k (B, H, T, d_k), v (B, H, T, d_v) for a cache of ``shape``."""
    B, H, Hq, dk, dv, _, _ = shape
    return tokens(rng, B, Hq, T, dk), tokens(rng, B, H, T, dk), tokens(rng, B, H, T, dv)


def close(a, b, atol=1e-6):
    assert_allclose(a, b, rtol=1e-5, atol=atol)


def steps_match_reference(rule, shape, rng, T):
    """T steps of a kvfold cache and of kvfold.reference's give the same outputs, memory and visible set."""
    from kvfold.reference import ReferenceCache

    cache, ref = make_cache(rule, shape), make_cache(rule, shape, ReferenceCache)
    q, k, v = shape_tokens(rng, shape, T)
    for t in range(T):
        close(cache.step(q[:, :, t], k[:, :, t], v[:, :, t]), ref.step(q[:, :, t], k[:, :, t], v[:, :, t]))
    for a, b in zip(cache.memory() + cache.visible()[:2], ref.memory() + ref.visible()[:2]):
        close(a, b)
    np.testing.assert_array_equal(cache.visible()[2], ref.visible()[2])
    np.testing.assert_array_equal(cache.length, ref.length)


def blocks_then_forward(rule, shape, rng, T, blocks, reset_rows=()):
    """A kvfold cache and kvfold.reference's take the same tokens in ``blocks`` ((lo, hi) ranges, each
    attended after), reset ``reset_rows``, then a forward over the rest, with the same outputs; returns both."""
    from kvfold.reference import ReferenceCache

    cache, ref = make_cache(rule, shape), make_cache(rule, shape, ReferenceCache)
    q, k, v = shape_tokens(rng, shape, T)
    for lo, hi in blocks:
        cache.update(k[:, :, lo:hi], v[:, :, lo:hi])
        ref.update(k[:, :, lo:hi], v[:, :, lo:hi])
        close(cache.attend(q[:, :, hi - 1]), ref.attend(q[:, :, hi - 1]))
    if reset_rows:
        cache.reset(rows=list(reset_rows))
        ref.reset(rows=list(reset_rows))
    rest = blocks[-1][1]
    close(cache.forward(*(x[:, :, rest:] for x in (q, k, v))), ref.forward(*(x[:, :, rest:] for x in (q, k, v))))
    return cache, ref


def unchanged(cache, call, error, *words):
    """``call()`` raises ``error`` with each of ``words`` in its message and leaves ``cache`` as it was."""
    before = cache.to_bytes()
    with pytest.raises(error) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert cache.to_bytes() == before
