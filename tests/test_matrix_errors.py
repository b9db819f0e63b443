"""Matrix memories given bad input: a clear error naming the argument, and the cache exactly as it was."""

import numpy as np
import pytest

import kvfold
from conftest import unchanged
from kvfold import rules


def fed(rule, window=2, sinks=1, **gates):
    cache = kvfold.MemoryCache(
        rule, num_heads=2, head_dim=4, value_dim=3, num_query_heads=4, batch_size=2, window=window, sinks=sinks
    )
    rng = np.random.default_rng(0)
    g = {}
    if "decay" in gates:
        g["decay"] = -rng.random((2, 2, 5))
    if "beta" in gates:
        g["beta"] = rng.random((2, 2, 5))
    cache.update(rng.standard_normal((2, 2, 5, 4)) / 2, rng.standard_normal((2, 2, 5, 3)), **g)
    return cache


K, V, Q = np.zeros((2, 2, 4)), np.zeros((2, 2, 3)), np.zeros((2, 4, 4))
G, B1 = -np.ones((2, 2)), np.ones((2, 2))


@pytest.mark.parametrize(
    "rule, gates, kw, words",
    [
        (rules.Gated(), dict(decay=1), {}, ["decay", "needs a per-token decay", "got none"]),
        (rules.GatedDelta(), dict(decay=1, beta=1), dict(decay=G), ["beta", "needs a per-token beta"]),
        (rules.Delta(), dict(beta=1), {}, ["beta", "needs"]),
        (rules.Linear(), {}, dict(decay=G), ["decay", "linear rule takes no decay"]),
        (rules.Gated(), dict(decay=1), dict(decay=G, beta=B1), ["beta", "gated rule takes no beta"]),
        (rules.Gated(decay=[-0.1, -0.2]), {}, dict(decay=G), ["decay", "constant decay"]),
        (rules.Delta(beta=0.5), {}, dict(beta=B1), ["beta", "constant beta"]),
        (rules.Cumulative(), {}, dict(beta=B1), ["beta", "cumulative rule takes no per-token gates"]),
        (rules.Gated(), dict(decay=1), dict(decay=np.zeros((2, 3))), ["decay", "(B=2, H=2)", "d_k=4", "(2, 3)"]),
        (rules.Gated(), dict(decay=1), dict(decay=np.zeros((2, 2, 1, 4))), ["decay", "one token"]),
        (rules.Delta(), dict(beta=1), dict(beta=np.zeros((2, 2, 4))), ["beta", "(B=2, H=2)", "(2, 2, 4)"]),
        (
            rules.Gated(),
            dict(decay=1),
            dict(decay=np.array([[0.0, np.nan], [0.0, 0.0]])),
            ["decay", "NaN", "[b=0, h=1, t=0]"],
        ),
        (
            rules.Delta(),
            dict(beta=1),
            dict(beta=np.array([[0.0, 0.0], [np.inf, 0.0]])),
            ["beta", "Inf", "[b=1, h=0, t=0]"],
        ),
        (rules.Gated(), dict(decay=1), dict(decay=np.zeros((2, 2), complex)), ["decay", "complex"]),
    ],
)
def test_bad_gates(rule, gates, kw, words):
    cache = fed(rule, **gates)
    error = TypeError if "complex" in words else ValueError
    unchanged(cache, lambda: cache.update(K, V, **kw), error, *words)
    unchanged(cache, lambda: cache.step(Q, K, V, **kw), error, *words)


def test_block_gates_must_match_the_block():
    cache = fed(rules.GatedDelta(), decay=1, beta=1)
    k, v, q = np.zeros((2, 2, 3, 4)), np.zeros((2, 2, 3, 3)), np.zeros((2, 4, 3, 4))
    unchanged(
        cache,
        lambda: cache.update(k, v, decay=np.zeros((2, 2, 4)), beta=np.zeros((2, 2, 3))),
        ValueError,
        "decay",
        "T=3",
        "for a block",
        "(2, 2, 4)",
    )
    unchanged(
        cache,
        lambda: cache.forward(q, k, v, decay=np.zeros((2, 2, 3)), beta=np.zeros((2, 2))),
        ValueError,
        "beta",
        "(B=2, H=2, T=3)",
    )
    cache.forward(q, k, v, decay=np.zeros((2, 2, 3, 4)), beta=np.zeros((2, 2, 3)))  # per key dimension is fine
    assert cache.length.tolist() == [8, 8]


def test_check_finite_false_skips_the_gate_check():
    cache = kvfold.MemoryCache(rules.Delta(), num_heads=1, head_dim=2, check_finite=False)
    cache.update(np.zeros((1, 1, 2)), np.zeros((1, 1, 2)), beta=np.full((1, 1), np.nan))
    assert cache.length.tolist() == [1]


def test_load_memory_errors():
    cache = fed(rules.Linear())
    S = np.zeros((2, 2, 4, 3))
    unchanged(
        cache,
        lambda: cache.load_memory(np.zeros((2, 2, 3, 4))),
        ValueError,
        "S",
        "(B=2, H=2, d_k=4, d_v=3)",
        "(2, 2, 3, 4)",
    )
    unchanged(cache, lambda: cache.load_memory(S, np.zeros((2, 2, 4))), ValueError, "z", "keeps no z")
    bad = S.copy()
    bad[1, 0, 2, 1] = np.nan
    unchanged(cache, lambda: cache.load_memory(bad), ValueError, "S", "NaN", "[b=1, h=0, d_k=2, d_v=1]")
    unchanged(cache, lambda: cache.load_memory("S"), TypeError, "S")
    normalized = fed(rules.Linear("elu1", normalize=True))
    unchanged(normalized, lambda: normalized.load_memory(S), ValueError, "z", "got none")
    unchanged(normalized, lambda: normalized.load_memory(S, np.zeros((2, 2, 3))), ValueError, "z", "(B=2, H=2, d_k=4)")
    summary = fed(rules.Cumulative())
    unchanged(summary, lambda: summary.load_memory(S), ValueError, "load_memory", "only matrix rules")


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: rules.Gated(decay=-0.5), ValueError, ["decay", "(H,) or (H, d_k)", "scalar"]),
        (lambda: rules.Gated(decay=np.zeros((2, 2, 2))), ValueError, ["decay", "(2, 2, 2)"]),
        (lambda: rules.Gated(decay=[0.0, np.nan]), ValueError, ["decay", "finite"]),
        (lambda: rules.Gated(decay=[[0.0], [0.0, 1.0]]), ValueError, ["decay", "regular array"]),
        (lambda: rules.Gated(decay="fast"), TypeError, ["decay"]),
        (lambda: rules.Delta(beta=[[0.5]]), ValueError, ["beta", "scalar or of shape (H,)"]),
        (lambda: rules.GatedDelta(beta=np.inf), ValueError, ["beta", "finite"]),
        (lambda: rules.Linear("tanh"), ValueError, ["feature_map", "'elu1'", "tanh"]),
        (lambda: rules.Linear(normalize=1), TypeError, ["normalize"]),
        (lambda: rules.Linear(feature_map=None), TypeError, ["feature_map"]),
        (lambda: rules.Linear(eps=0.0), ValueError, ["eps", "> 0"]),
        (lambda: rules.Linear(mix="x"), TypeError, ["mix"]),
        (lambda: rules.Delta(mix=np.zeros((2, 2))), ValueError, ["mix", "(Hq,)"]),
    ],
)
def test_bad_rules(make, error, words):
    with pytest.raises(error) as info:
        make()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize(
    "rule, words",
    [
        (rules.Gated(decay=[-0.1, -0.2, -0.3]), ["decay", "(H=2,)", "d_k=4", "(3,)"]),
        (rules.Gated(decay=np.zeros((2, 5))), ["decay", "(2, 5)"]),
        (rules.Delta(beta=[0.1, 0.2, 0.3]), ["beta", "(H=2,)", "(3,)"]),
        (rules.Linear(mix=[0.0, 1.0]), ["mix", "(Hq=4,)", "(2,)"]),
    ],
)
def test_rule_constants_must_fit_the_cache(rule, words):
    with pytest.raises(ValueError) as info:
        kvfold.MemoryCache(rule, num_heads=2, head_dim=4, num_query_heads=4)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


LONG_BLOCK_RULES = [rules.Linear(), rules.Linear(normalize=True), rules.GatedDelta(decay=[-0.1, -0.2], beta=[0.5, 0.9])]


@pytest.mark.parametrize("rule", LONG_BLOCK_RULES, ids=repr)
@pytest.mark.parametrize(
    "name, where, index",
    [
        ("k", (1, 0, 60, 3), "[b=1, h=0, t=60, d_k=3]"),
        ("v", (0, 1, 0, 0), "[b=0, h=1, t=0, d_v=0]"),
        ("q", (1, 3, 63, 2), "[b=1, hq=3, t=63, d_k=2]"),
    ],
)
def test_a_long_block_with_one_bad_value_changes_nothing(rule, name, where, index):
    """A long block into a matrix memory alone has its values checked chunk by chunk as they are folded:
    a NaN in any chunk, however late, gives the same error as a check before anything changes."""
    cache = fed(rule, window=0, sinks=0)
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal((2, 2, 64, 4)) / 2, rng.standard_normal((2, 2, 64, 3))
    q = rng.standard_normal((2, 4, 64, 4))
    good = kvfold.MemoryCache.from_bytes(cache.to_bytes())
    expected = good.forward(q, k, v)
    bad = {"k": k, "v": v, "q": q}[name].copy()
    bad[where] = np.nan
    args = {"q": q, "k": k, "v": v, name: bad}
    unchanged(cache, lambda: cache.forward(**args), ValueError, name, "NaN", index)
    np.testing.assert_array_equal(cache.forward(q, k, v), expected)
    assert cache.to_bytes() == good.to_bytes()
