"""The Python surface: properties, conversions, copies, pickling, reset, threads."""

import copy
import pickle
import threading

import numpy as np
import pytest
from numpy.testing import assert_allclose

import kvfold
from conftest import make_cache
from kvfold import reference, rules


def make(**kw):
    cfg = dict(num_heads=2, head_dim=4, value_dim=3, num_query_heads=4, batch_size=2, window=3, sinks=1)
    cfg.update(kw)
    return kvfold.MemoryCache(kw.pop("rule", rules.EMA(0.5)), **{k: v for k, v in cfg.items() if k != "rule"})


def feed(cache, rng, T=9):
    k = rng.standard_normal((cache.batch_size, cache.num_heads, T, cache.head_dim), dtype=np.float32)
    v = rng.standard_normal((cache.batch_size, cache.num_heads, T, cache.value_dim), dtype=np.float32)
    cache.update(k, v)
    return k, v


def query(cache, rng):
    return rng.standard_normal((cache.batch_size, cache.num_query_heads, cache.head_dim), dtype=np.float32)


def test_properties_and_repr():
    c = make_cache(rules.Compressive(4, 2, "max"), (3, 2, 8, 16, 16, 5, 2), dtype="float16", check_finite=False)
    assert (c.num_heads, c.head_dim, c.value_dim, c.num_query_heads) == (2, 16, 16, 8)
    assert (c.batch_size, c.window, c.sinks, c.dtype, c.check_finite) == (3, 5, 2, "float16", False)
    assert c.scale == pytest.approx(0.25)
    assert c.rule == rules.Compressive(4, 2, "max")
    assert c.memory_slots == 4
    assert c.length.dtype == np.int64 and c.length.tolist() == [0, 0, 0]
    assert "Compressive(slots=4, rate=2, pool='max')" in repr(c) and "window=5" in repr(c)
    assert kvfold.__version__ == "0.1.0"
    assert kvfold.simd_backend() in kvfold.available_backends()
    with pytest.raises(AttributeError):
        c.window = 3


def test_rule_none_is_drop_and_reprs_are_readable():
    assert kvfold.MemoryCache(None, num_heads=1, head_dim=2).rule == rules.Drop()
    assert repr(rules.Weighted([1, 2])) == "Weighted(betas=(1.0, 2.0))"
    assert repr(rules.EMA(0.5)) == "EMA(alpha=0.5)"
    assert rules.Moving(3) == rules.Moving(3) and hash(rules.Moving(3)) == hash(rules.Moving(3))


def test_explicit_scale_is_used(rng):
    c = make(scale=0.7)
    r = make_cache(rules.EMA(0.5), (2, 2, 4, 4, 3, 3, 1), cls=reference.ReferenceCache, scale=0.7)  # as make()
    k, v = feed(c, rng)
    r.update(k, v)
    q = query(c, rng)
    assert c.scale == pytest.approx(0.7)
    assert_allclose(c.attend(q), r.attend(q), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.int64, np.uint8])
def test_any_real_dtype_is_converted(dtype, rng):
    a, b = make(), make()
    k = rng.integers(-3, 4, (2, 2, 5, 4)).astype(dtype)
    v = rng.integers(0, 4, (2, 2, 5, 3)).astype(dtype)
    a.update(k, v)
    b.update(k.astype(np.float32), v.astype(np.float32))
    assert a.to_bytes() == b.to_bytes()


def test_non_contiguous_and_list_inputs(rng):
    a, b = make(), make()
    k = rng.standard_normal((2, 2, 4, 10), dtype=np.float32)[..., ::2, ::3]  # (2, 2, 2, 4) strided
    v = np.asfortranarray(rng.standard_normal((2, 2, 2, 3), dtype=np.float32))
    a.update(k, v)
    b.update(np.ascontiguousarray(k), np.ascontiguousarray(v))
    assert a.to_bytes() == b.to_bytes()
    q = query(a, rng)
    assert_allclose(a.attend(q.tolist()), b.attend(q))


def test_out_is_filled_and_returned(rng):
    c = make()
    feed(c, rng)
    q = query(c, rng)
    out = np.empty((2, 4, 3), np.float32)
    assert c.attend(q, out=out) is out
    assert_allclose(out, c.attend(q))
    k = rng.standard_normal((2, 2, 4), dtype=np.float32)
    v = rng.standard_normal((2, 2, 3), dtype=np.float32)
    d = c.copy()
    assert c.step(q, k, v, out=out) is out
    assert_allclose(out, d.step(q, k, v))


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_copy_pickle_deepcopy_are_independent(rng, dtype):
    c = make(rule=rules.Weighted((1, 2, 3)), dtype=dtype)
    feed(c, rng)
    q = query(c, rng)
    for other in (c.copy(), copy.copy(c), copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        assert type(other) is kvfold.MemoryCache
        assert other.rule == c.rule and other.dtype == dtype
        assert other.to_bytes() == c.to_bytes()
        np.testing.assert_array_equal(other.attend(q), c.attend(q))
        feed(other, rng, T=2)
        assert other.length.tolist() == [11, 11] and c.length.tolist() == [9, 9]


def test_reset_all_and_rows(rng):
    c = make()
    empty = make().to_bytes()
    feed(c, rng)
    c.reset(rows=[0, 1])
    assert c.to_bytes() == empty
    feed(c, rng)
    c.reset()
    assert c.to_bytes() == empty
    c.reset(rows=[])
    assert c.to_bytes() == empty


def test_memory_and_visible_shapes(rng):
    c = make(rule=rules.Compressive(3, 2))
    mk, mv = c.memory()
    assert mk.shape == (2, 2, 3, 4) and mv.shape == (2, 2, 3, 3)
    k, v, m = c.visible()
    assert k.shape == (2, 2, 0, 4) and m.shape == (2, 0) and m.dtype == bool
    feed(c, rng, T=10)  # 1 sink, 3 window, 6 folded -> 3 compressed slots
    k, v, m = c.visible()
    assert k.shape == (2, 2, 7, 4) and m.all()


def test_drop_has_no_slots(rng):
    c = make(rule=rules.Drop())
    feed(c, rng)
    mk, mv = c.memory()
    assert mk.shape == (2, 2, 0, 4)


def test_two_threads_share_one_cache_safely(rng):
    c = make(rule=rules.Cumulative(), batch_size=1, window=8)
    k = rng.standard_normal((1, 2, 1, 4), dtype=np.float32)
    v = rng.standard_normal((1, 2, 1, 3), dtype=np.float32)
    q = rng.standard_normal((1, 4, 4), dtype=np.float32)
    errors = []

    def work():
        try:
            for _ in range(2000):
                c.update(k, v)
                out = c.attend(q)
                assert np.isfinite(out).all()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert c.length.tolist() == [4000]
    # every pair is the same, so a consistent state has every visible row equal to it
    keys, values, mask = c.visible()
    assert_allclose(keys[0, :, :], np.broadcast_to(k[0, :, 0][:, None], keys[0].shape), rtol=1e-6)


@pytest.mark.parametrize(
    "rule", [rules.Moving(3), rules.Compressive(2, 3, "max"), rules.EMA(0.25), rules.Drop()], ids=repr
)
def test_every_rule_survives_pickling(rule):
    c = make(rule=rule)
    assert pickle.loads(pickle.dumps(c)).rule == rule


def test_rules_say_whether_they_are_matrix_memories_and_which_gates_they_take():
    assert not rules.Cumulative().matrix and not rules.GRU(np.zeros((6, 2)), np.zeros((6, 2))).matrix
    assert rules.Linear().matrix and rules.Gated().matrix and rules.Delta().matrix and rules.GatedDelta().matrix
    assert rules.Gated().per_token_gates == ("decay",)
    assert rules.Gated(decay=[-0.1]).per_token_gates == ()
    assert rules.Delta().per_token_gates == ("beta",)
    assert rules.GatedDelta(beta=0.5).per_token_gates == ("decay",)
    assert rules.GatedDelta().per_token_gates == ("decay", "beta")
    assert rules.Linear().per_token_gates == () and rules.EMA(0.5).per_token_gates == ()


def test_visible_into_caller_arrays_with_room_to_spare(rng):
    c = make(rule=rules.Compressive(3, 2))
    feed(c, rng, T=10)
    keys, values, mask = c.visible()
    assert c.visible_size == keys.shape[2] == 7
    k_out = np.full((2, 2, 9, 4), 7.0, np.float32)
    v_out = np.full((2, 2, 9, 3), 7.0, np.float32)
    k2, v2, m2 = c.visible(out=(k_out, v_out))
    assert k2 is k_out and v2 is v_out and m2.shape == (2, 9)
    np.testing.assert_array_equal(k_out[:, :, :7], keys)
    np.testing.assert_array_equal(v_out[:, :, :7], values)
    assert not k_out[:, :, 7:].any() and not v_out[:, :, 7:].any()
    assert m2[:, :7].all() and not m2[:, 7:].any()


SHARED = np.zeros(2 * 2 * 8 * 4, np.float32)


@pytest.mark.parametrize(
    "out, error, words",
    [
        ((np.zeros((2, 2, 6, 4), np.float32), np.zeros((2, 2, 6, 3), np.float32)), ValueError, ["room for the 7", "6"]),
        ((np.zeros((2, 2, 8, 4), np.float32), np.zeros((2, 2, 7, 3), np.float32)), ValueError, ["out", "(2, 2, 8, 3)"]),
        ((np.zeros((2, 2, 8, 4)), np.zeros((2, 2, 8, 3))), TypeError, ["float32"]),
        ((np.zeros((2, 8, 4), np.float32), np.zeros((2, 8, 3), np.float32)), ValueError, ["rows"]),
        (np.zeros((2, 2, 8, 4), np.float32), TypeError, ["tuple"]),
        (  # the values would overwrite the keys
            (SHARED.reshape(2, 2, 8, 4), SHARED[:96].reshape(2, 2, 8, 3)),
            ValueError,
            ["out", "separate arrays", "share memory"],
        ),
    ],
)
def test_visible_out_errors(out, error, words, rng):
    c = make(rule=rules.Compressive(3, 2))
    feed(c, rng, T=10)
    with pytest.raises(error) as info:
        c.visible(out=out)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
