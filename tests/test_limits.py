"""Limits: values out of range, unknown rule parameters, row indices and memory, each refused with a
message that says what was expected, leaving the cache as it was."""

import numpy as np
import pytest

import kvfold
from kvfold import rules
from robustness_helpers import pairs, run_python, state
from rule_cases import every_rule

pytestmark = pytest.mark.one_backend


# ---------------------------------------------------------------------------------------------
# Values out of range: refused with the range they must lie in, or computed right.


def test_a_scale_that_float32_cannot_hold_is_refused():
    for scale in [1e-300, 1e-46, 1e39]:
        with pytest.raises(ValueError, match="scale.*float32"):
            kvfold.MemoryCache(None, 1, 4, scale=scale)
    assert kvfold.MemoryCache(None, 1, 4, scale=1e-40).scale > 0


@pytest.mark.parametrize("betas", [[1e308, 1e308], [1e-320], [0, 0, 5e-324], [1e-310, 3e-310]])
def test_weighted_with_extreme_weights_keeps_a_finite_exact_memory(betas):
    rule = rules.Weighted(betas)
    cache = kvfold.MemoryCache(rule, 2, 4)
    k, v = pairs(1, 2, 4, T=5)
    cache.update(k, v)
    keys, values = cache.memory()
    ref = kvfold.reference.ReferenceCache(rule, 2, 4)
    ref.update(k, v)
    want_k, want_v = ref.memory()
    assert np.isfinite(keys).all() and np.isfinite(values).all()
    np.testing.assert_allclose(keys, want_k, rtol=1e-6)
    np.testing.assert_allclose(values, want_v, rtol=1e-6)


def test_weights_whose_ratio_underflows_are_refused():
    with pytest.raises(ValueError, match=r"betas\[-1\].*too small"):
        rules.Weighted([1e308, 1e-20])


@pytest.mark.parametrize(
    "make_rule, words",
    [
        (lambda: rules.Gated(decay=[50.0]), ["decay", "<= 0"]),
        (lambda: rules.GatedDelta(decay=[[0.1, -1.0]], beta=0.5), ["decay", "<= 0"]),
        (lambda: rules.Delta(beta=2.5), ["beta", "[0, 2]"]),
        (lambda: rules.GatedDelta(decay=[-1.0], beta=[-0.1]), ["beta", "[0, 2]"]),
    ],
)
def test_gates_that_would_grow_the_memory_are_refused(make_rule, words):
    with pytest.raises(ValueError) as info:
        make_rule()
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize(
    "rule, gates, words",
    [
        (rules.Gated(), dict(decay=np.full((1, 2), 100.0)), ["decay", "<= 1", "100"]),
        (rules.Delta(), dict(beta=np.full((1, 2), 3.0)), ["beta", "[0, 2]", "3"]),
    ],
    ids=["decay", "beta"],
)
def test_per_token_gates_out_of_range_are_refused_and_change_nothing(rule, gates, words):
    cache = kvfold.MemoryCache(rule, 2, 4)
    ok = {name: np.full((1, 2), -0.5 if name == "decay" else 0.5) for name in gates}
    cache.update(*pairs(1, 2, 4, seed=1), **ok)
    before = state(cache)
    with pytest.raises(ValueError) as info:
        cache.update(*pairs(1, 2, 4, seed=2), **gates)
    for w in words:
        assert w in str(info.value)
    assert state(cache) == before


@pytest.mark.parametrize("dtype, big", [("float16", 7e4), ("float16", 65520.0), ("bfloat16", 3.3962e38)])
def test_values_that_half_storage_would_make_infinite_are_refused(dtype, big):
    cache = kvfold.MemoryCache(rules.Cumulative(), 2, 4, window=2, dtype=dtype)
    cache.update(*pairs(1, 2, 4, T=3))
    before = state(cache)
    k, v = pairs(1, 2, 4)
    k[0, 1, 2] = big
    with pytest.raises(
        ValueError, match=f"k: expected values that {dtype} storage holds.*at \\[b=0, h=1, t=0, d_k=2\\]"
    ):
        cache.update(k, v)
    assert state(cache) == before
    unchecked = kvfold.MemoryCache(rules.Cumulative(), 2, 4, window=2, dtype=dtype, check_finite=False)
    unchecked.update(k, v)  # the caller opted out of the check
    keys, _, _ = unchecked.visible()
    assert np.isinf(keys[0, 1, 0, 2])
    fine = kvfold.MemoryCache(rules.Cumulative(), 2, 4, window=2, dtype="float16")
    k[0, 1, 2] = 65504.0  # the largest float16
    fine.update(k, v)
    assert fine.visible()[0][0, 1, 0, 2] == 65504.0


# ---------------------------------------------------------------------------------------------
# Unknown rule parameters: refused by the C++ core, by Python, and in saved state.

KINDS = {
    cls.kind: cls
    for cls in (
        rules.Drop,
        rules.Cumulative,
        rules.Moving,
        rules.Weighted,
        rules.EMA,
        rules.Compressive,
        rules.GRU,
        rules.Linear,
        rules.Gated,
        rules.Delta,
        rules.GatedDelta,
    )
}
GOOD = every_rule(head_dim=4, value_dim=4)


@pytest.mark.parametrize("rule", GOOD, ids=lambda r: r.kind)
def test_unknown_parameters_and_options_are_refused_everywhere(rule):
    kind, arrays, options, fn = rule._spec()
    with pytest.raises(ValueError, match=f"{kind} rule: takes no parameter 'bogus'"):
        kvfold._core._check_rule((kind, {**arrays, "bogus": np.array(1.0)}, options, fn))
    with pytest.raises(ValueError, match=f"{kind} rule: takes no option 'bogus'"):
        kvfold._core._check_rule((kind, arrays, {**options, "bogus": "x"}, fn))
    with pytest.raises(ValueError, match="takes no parameter 'bogus'"):
        rules.from_spec((kind, {**arrays, "bogus": np.array(1.0)}, options, None))
    cache = kvfold.MemoryCache(rule, 2, 4)
    with pytest.raises(ValueError, match="data: invalid kvfold state.*takes no parameter 'bogus'"):
        kvfold.MemoryCache.from_bytes(with_extra_parameter(cache.to_bytes(), len(kind)))


def with_extra_parameter(data, kind_length):
    """The state with a scalar parameter 'bogus' = 1.0 added to its rule (size and CRC fixed)."""
    import struct
    import zlib

    at = 24 + 7 * 8 + 8 + 2 + 26 + 4 + kind_length  # header, config (RoPE, retention), kind: then the array count
    (count,) = struct.unpack_from("<I", data, at)
    extra = struct.pack("<I", 5) + b"bogus" + struct.pack("<I", 0) + struct.pack("<d", 1.0)
    # arrays are stored by name; "bogus" sorts before every real parameter name used here
    body = data[:at] + struct.pack("<I", count + 1) + extra + data[at + 4 : -4]
    body = body[:16] + struct.pack("<Q", len(body) + 4) + body[24:]
    return body + struct.pack("<I", zlib.crc32(body))


# ---------------------------------------------------------------------------------------------
# Row indices: a bare integer or a masked array is refused, not guessed at.


def test_a_bare_integer_is_not_a_list_of_rows():
    cache = kvfold.MemoryCache(rules.EMA(0.5), 2, 4, batch_size=2)
    cache.update(*pairs(2, 2, 4, T=3))
    before = state(cache)
    cp = cache.checkpoint()
    for call in [
        lambda: cache.reorder(1),
        lambda: cache.select(1),
        lambda: cache.reset(1),
        lambda: cache.rollback(cp, rows=1),
        lambda: cache.reorder(np.int64(0)),
    ]:
        with pytest.raises(TypeError, match="single .*for one row"):
            call()
    assert state(cache) == before


def test_masked_arrays_are_refused():
    cache = kvfold.MemoryCache(rules.EMA(0.5), 2, 4, batch_size=2)
    k, v = pairs(2, 2, 4)
    masked = np.ma.masked_array(k, mask=np.zeros_like(k, dtype=bool))
    for name, call in [
        ("k", lambda: cache.update(masked, v)),
        ("v", lambda: cache.update(k, masked)),
        ("q", lambda: cache.attend(masked)),
        ("indices", lambda: cache.reorder(np.ma.masked_array([1, 0]))),
        ("rows", lambda: cache.reset(np.ma.masked_array([1], mask=[True]))),
    ]:
        with pytest.raises(TypeError, match=f"{name}: expected a plain array, got a numpy.ma.MaskedArray"):
            call()
    assert cache.length.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------
# Memory limits: a cache larger than the process may hold is refused up front.


def test_a_cache_beyond_the_address_space_limit_is_a_value_error():
    done = run_python("""
        import resource
        import kvfold
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        try:
            kvfold.MemoryCache(None, 8, 128, batch_size=64, window=8192)  # 4 GiB of keys and values
        except ValueError as e:
            assert "RLIMIT_AS" in str(e), e
            print("refused")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "refused", done.stderr
