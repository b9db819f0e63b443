"""Bad input: a clear ValueError/TypeError naming the argument, and the cache exactly as it was."""

import numpy as np
import pytest

import kvfold
from conftest import unchanged
from kvfold import rules


@pytest.fixture
def cache(rng):
    c = kvfold.MemoryCache(
        rules.Cumulative(), num_heads=2, head_dim=4, value_dim=3, num_query_heads=4, batch_size=2, window=2, sinks=1
    )
    c.update(rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 2, 5, 3)))
    return c


K = np.zeros((2, 2, 4), np.float32)
V = np.zeros((2, 2, 3), np.float32)
Q = np.zeros((2, 4, 4), np.float32)


@pytest.mark.parametrize(
    "k, v, words",
    [
        (np.zeros((2, 2, 5), np.float32), V, ["k", "(2, 2, 5)", "d_k=4"]),
        (np.zeros((2, 3, 4), np.float32), V, ["k", "H=2"]),
        (np.zeros((3, 2, 4), np.float32), V, ["k", "B=2"]),
        (np.zeros((2, 4), np.float32), V, ["k", "(2, 4)"]),
        (np.zeros((2, 2, 0, 4), np.float32), np.zeros((2, 2, 0, 3), np.float32), ["T >= 1"]),
        (K, np.zeros((2, 2, 4), np.float32), ["v", "d_v=3"]),
        (np.zeros((2, 2, 2, 4), np.float32), np.zeros((2, 2, 3, 3), np.float32), ["v", "same tokens"]),
        (np.zeros((2, 2, 2, 4), np.float32), V, ["v", "same tokens"]),
    ],
)
def test_bad_shapes(cache, k, v, words):
    unchanged(cache, lambda: cache.update(k, v), ValueError, *words)


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((2, 2, 4), np.complex64), ["k", "complex64"]),
        (np.array([["a"]]), ["k", "<U1"]),
        (np.zeros((2, 2, 4), bool), ["k", "bool"]),
        (np.zeros((2, 2, 4), object), ["k", "object"]),
        ("text", ["k", "expected a numeric array, got str"]),
        (None, ["k", "expected a numeric array, got None"]),
        ([[object()]], ["k", "expected a numeric array, got list"]),
        ([[[1j] * 4] * 2] * 2, ["k", "complex128"]),
    ],
)
def test_bad_dtypes(cache, bad, words):
    unchanged(cache, lambda: cache.update(bad, V), TypeError, *words)


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf"), (1e39, "Inf")])
def test_non_finite(cache, value, word):
    k = np.zeros((2, 2, 1, 4))
    k[1, 0, 0, 3] = value
    unchanged(cache, lambda: cache.update(k, np.zeros((2, 2, 1, 3))), ValueError, "k", word, "[b=1, h=0, t=0, d_k=3]")
    # a single token's k has no T axis; the index names each axis, so it reads either way
    unchanged(cache, lambda: cache.update(k[:, :, 0], V), ValueError, "k", word, "[b=1, h=0, t=0, d_k=3]")
    q = Q.astype(np.float64)
    q[0, 3, 1] = value
    unchanged(cache, lambda: cache.attend(q), ValueError, "q", word, "[b=0, hq=3, d_k=1]")
    unchanged(cache, lambda: cache.step(q, K, V), ValueError, "q", word, "[b=0, hq=3, d_k=1]")


def test_check_finite_false_skips_the_check():
    c = kvfold.MemoryCache(rules.Drop(), num_heads=1, head_dim=2, window=4, check_finite=False)
    c.update(np.full((1, 1, 2), np.nan), np.zeros((1, 1, 2)))
    assert c.length.tolist() == [1]


def test_query_and_out_errors(cache):
    unchanged(cache, lambda: cache.attend(np.zeros((2, 2, 4))), ValueError, "q", "Hq=4")
    unchanged(cache, lambda: cache.attend(Q, out=np.zeros((2, 4, 3))), TypeError, "out", "float32")
    unchanged(cache, lambda: cache.attend(Q, out=np.zeros((2, 4, 4), np.float32)), ValueError, "out", "(2, 4, 3)")
    unchanged(cache, lambda: cache.attend(Q, out=np.zeros((2, 4, 3), np.float32).T.copy().T), ValueError, "out")
    unchanged(cache, lambda: cache.attend(Q, out=[0.0]), TypeError, "out")
    unchanged(
        cache, lambda: cache.step(Q, np.zeros((2, 2, 1, 4)), np.zeros((2, 2, 1, 3))), ValueError, "step", "forward"
    )
    unchanged(cache, lambda: cache.forward(Q, K, V), ValueError, "q")
    q4 = np.zeros((2, 4, 3, 4))
    unchanged(cache, lambda: cache.forward(q4, np.zeros((2, 2, 2, 4)), np.zeros((2, 2, 2, 3))), ValueError, "k", "T=3")


def test_reset_rows_errors(cache):
    unchanged(cache, lambda: cache.reset(rows=[0, 2]), ValueError, "rows", "[0, 2)", "got 2")
    unchanged(cache, lambda: cache.reset(rows=[-1]), ValueError, "rows")
    unchanged(cache, lambda: cache.reset(rows=[0.5]), TypeError, "rows")
    unchanged(cache, lambda: cache.reset(rows="a"), TypeError, "rows")
    unchanged(cache, lambda: cache.reset(rows=[[0]]), ValueError, "rows", "1-D")


@pytest.mark.parametrize(
    "kw, error, words",
    [
        (dict(num_heads=0), ValueError, ["num_heads", "got 0"]),
        (dict(num_heads=2, num_query_heads=3), ValueError, ["num_query_heads", "multiple of num_heads=2", "got 3"]),
        (dict(head_dim=-4), ValueError, ["head_dim", "got -4"]),
        (dict(value_dim=0), ValueError, ["value_dim"]),
        (dict(batch_size=0), ValueError, ["batch_size"]),
        (dict(window=-1), ValueError, ["window", "got -1"]),
        (dict(sinks=-2), ValueError, ["sinks"]),
        (dict(window=10**15), ValueError, ["window"]),
        (dict(window=2**31, num_heads=64, head_dim=128), ValueError, ["cache size", "bytes"]),
        (dict(batch_size=10**12), ValueError, ["batch_size"]),
        (dict(head_dim=2.5), TypeError, ["head_dim", "integer"]),
        (dict(window="3"), TypeError, ["window"]),
        (dict(scale=0), ValueError, ["scale", "> 0"]),
        (dict(scale=float("nan")), ValueError, ["scale"]),
        (dict(scale=float("inf")), ValueError, ["scale"]),
        (dict(scale="x"), TypeError, ["scale"]),
        (dict(dtype="int4"), ValueError, ["dtype", "int4", "float16", "int8"]),
        (dict(dtype=None), TypeError, ["dtype", "float16", "got None"]),
        (dict(check_finite=1), TypeError, ["check_finite"]),
        (dict(rule="cumulative"), TypeError, ["rule"]),
    ],
)
def test_bad_configuration(kw, error, words):
    cfg = dict(rule=rules.Cumulative(), num_heads=1, head_dim=4)
    cfg.update(kw)
    with pytest.raises(error) as info:
        kvfold.MemoryCache(**cfg)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: rules.EMA(0), ValueError, ["alpha", "(0, 1]"]),
        (lambda: rules.EMA(1.5), ValueError, ["alpha", "got 1.5"]),
        (lambda: rules.EMA(float("nan")), ValueError, ["alpha"]),
        (lambda: rules.EMA("a"), TypeError, ["alpha"]),
        (lambda: rules.Moving(0), ValueError, ["n", "got 0"]),
        (lambda: rules.Moving(2**33), ValueError, ["n", "got 8589934592"]),
        (lambda: rules.Moving(2.0), TypeError, ["n", "integer"]),
        (lambda: rules.Weighted(()), ValueError, ["betas", "non-empty"]),
        (lambda: rules.Weighted((1, -1, 1)), ValueError, ["betas[1]", ">= 0"]),
        (lambda: rules.Weighted((1, float("inf"))), ValueError, ["betas[1]", "finite"]),
        (lambda: rules.Weighted((1, 0)), ValueError, ["betas[-1]"]),
        (lambda: rules.Weighted((1, "a")), TypeError, ["betas[1]"]),
        (lambda: rules.Weighted(3), TypeError, ["betas"]),
        (lambda: rules.Compressive(0, 2), ValueError, ["slots", "got 0"]),
        (lambda: rules.Compressive(2, 0), ValueError, ["rate"]),
        (lambda: rules.Compressive(2, 2, "median"), ValueError, ["pool", "median"]),
        (lambda: rules.Compressive(2, 2, 3), TypeError, ["pool"]),
    ],
)
def test_bad_rules(make, error, words):
    with pytest.raises(error) as info:
        make()
    for w in words:
        assert w in str(info.value), (w, str(info.value))
