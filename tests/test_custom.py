"""rules.Custom: a Python fold inside the C++ cache."""

import copy
import pickle
import threading

import numpy as np
import pytest

import kvfold
from conftest import SHAPES, close, make_cache
from conftest import shape_tokens as data
from kvfold import reference, rules


def max_and_decay(mem_k, mem_v, k, v, count):
    """Slot 0: the elementwise max of every folded pair; slot 1: a decaying sum."""
    mk, mv = mem_k.copy(), mem_v.copy()
    if count == 0:
        mk[:, 0], mv[:, 0] = k, v
    else:
        mk[:, 0], mv[:, 0] = np.maximum(mk[:, 0], k), np.maximum(mv[:, 0], v)
    mk[:, 1], mv[:, 1] = 0.5 * mk[:, 1] + k, 0.5 * mv[:, 1] + v
    return mk, mv


RULE = rules.Custom(max_and_decay, slots=2)

# (batch, KV heads, query heads, d_k, d_v, window, sinks)
SHAPES = SHAPES[:5]


def make(shape, rule=RULE, cls=kvfold.MemoryCache):
    return make_cache(rule, shape, cls)


def state(cache, q):
    """Everything observable about a cache (a Custom rule has no to_bytes)."""
    return (cache.length.tolist(), *cache.memory(), *cache.visible(), cache.attend(q))


def same_state(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, rng):
    cache, ref = make(shape), make(shape, cls=reference.ReferenceCache)
    q, k, v = data(rng, shape, 16)
    for t in range(6):
        close(cache.step(q[:, :, t], k[:, :, t], v[:, :, t]), ref.step(q[:, :, t], k[:, :, t], v[:, :, t]))
    cache.update(k[:, :, 6:9], v[:, :, 6:9])
    ref.update(k[:, :, 6:9], v[:, :, 6:9])
    close(cache.attend(q[:, :, 8]), ref.attend(q[:, :, 8]))
    close(cache.forward(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:]), ref.forward(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:]))
    for mine, theirs in zip(cache.memory(), ref.memory()):
        close(mine, theirs)
    for mine, theirs in zip(cache.visible(), ref.visible()):
        close(mine, theirs)


def test_forward_is_a_loop_of_step(rng):
    shape = (2, 2, 4, 5, 3, 2, 1)
    a, b = make(shape), make(shape)
    q, k, v = data(rng, shape, 11)
    outs = np.stack([b.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(11)], axis=2)
    np.testing.assert_array_equal(a.forward(q, k, v), outs)
    same_state(state(a, q[:, :, 0]), state(b, q[:, :, 0]))


def test_fn_sees_one_row_with_every_head_and_the_fold_count(rng):
    calls = []

    def record(mem_k, mem_v, k, v, count):
        calls.append((mem_k.shape, mem_v.shape, k.shape, v.shape, mem_k.dtype, count))
        return mem_k + 1, mem_v.astype(np.float64) - 1  # any float dtype is taken

    cache = kvfold.MemoryCache(
        rules.Custom(record, slots=3), num_heads=2, head_dim=4, value_dim=5, batch_size=2, window=2, sinks=1
    )
    _, k, v = data(rng, (2, 2, 2, 4, 5, 0, 0), 6)
    cache.update(k, v)  # per row: 1 sink, 2 in the window, 3 folded
    assert [c[5] for c in calls] == [0, 1, 2] * 2
    assert set(c[:5] for c in calls) == {((2, 3, 4), (2, 3, 5), (2, 4), (2, 5), np.dtype(np.float32))}
    mk, mv = cache.memory()
    np.testing.assert_array_equal(mk, np.full((2, 2, 3, 4), 3.0))
    np.testing.assert_array_equal(mv, np.full((2, 2, 3, 5), -3.0))


@pytest.mark.parametrize(
    "result, error, words",
    [
        (lambda mk, mv: (mk[:, :, :2], mv), ValueError, ["new_mem_k", "(H=2, slots=2, d_k=4)", "(2, 2, 2)"]),
        (lambda mk, mv: (mk, mv[0]), ValueError, ["new_mem_v", "d_v=3", "(2, 3)"]),
        (lambda mk, mv: (mk.astype(np.int64), mv), TypeError, ["new_mem_k", "float", "int64"]),
        (lambda mk, mv: (mk, "values"), TypeError, ["new_mem_v", "float"]),
        (lambda mk, mv: mk, TypeError, ["pair", "ndarray"]),
        (lambda mk, mv: (mk, mv, mv), TypeError, ["pair", "length 3"]),
        (lambda mk, mv: None, TypeError, ["pair", "NoneType"]),
    ],
)
def test_bad_results_raise_and_change_nothing(result, error, words, rng):
    shape = (2, 2, 4, 4, 3, 2, 1)
    fail = {"now": False}

    def fn(mem_k, mem_v, k, v, count):
        return result(mem_k, mem_v) if fail["now"] else max_and_decay(mem_k, mem_v, k, v, count)

    cache = make(shape, rules.Custom(fn, slots=2))
    q, k, v = data(rng, shape, 12)
    cache.update(k[:, :, :6], v[:, :, :6])
    before = state(cache, q[:, :, 0])
    fail["now"] = True
    for call in (
        lambda: cache.update(k[:, :, 6:], v[:, :, 6:]),
        lambda: cache.forward(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:]),
        lambda: cache.step(q[:, :, 6], k[:, :, 6], v[:, :, 6]),
    ):
        with pytest.raises(error) as info:
            call()
        for w in words:
            assert w in str(info.value), (w, str(info.value))
        same_state(state(cache, q[:, :, 0]), before)


def test_an_exception_in_fn_propagates_and_changes_nothing(rng):
    shape = (2, 1, 1, 3, 3, 0, 0)
    seen = []

    def fn(mem_k, mem_v, k, v, count):
        seen.append(count)
        if len(seen) == 7:  # row 1 of the fourth token, after row 0's fold of it
            raise KeyError("boom")
        return max_and_decay(mem_k, mem_v, k, v, count)

    cache = make(shape, rules.Custom(fn, slots=2))
    q, k, v = data(rng, shape, 6)
    cache.update(k[:, :, :3], v[:, :, :3])
    before = state(cache, q[:, :, 0])
    with pytest.raises(KeyError, match="boom"):
        cache.update(k[:, :, 3:], v[:, :, 3:])
    same_state(state(cache, q[:, :, 0]), before)


def test_cannot_be_saved_but_copies(rng):
    shape = (1, 2, 2, 3, 3, 1, 0)
    cache = make(shape)
    q, k, v = data(rng, shape, 8)
    cache.update(k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="Custom rules cannot be serialized"):
        cache.to_bytes()
    with pytest.raises(ValueError, match="Custom rules cannot be serialized"):
        pickle.dumps(cache)
    for other in (cache.copy(), copy.deepcopy(cache)):
        assert other.rule is RULE
        same_state(state(other, q[:, :, 0]), state(cache, q[:, :, 0]))
        other.update(k[:, :, 4:], v[:, :, 4:])
        assert other.length.tolist() == [8] and cache.length.tolist() == [4]


def test_rule_arguments():
    assert RULE == rules.Custom(max_and_decay, 2) and RULE != rules.Custom(max_and_decay, 1)
    with pytest.raises(TypeError, match="fn must be callable"):
        rules.Custom(3)
    with pytest.raises(ValueError, match="slots"):
        rules.Custom(max_and_decay, slots=0)
    with pytest.raises(TypeError, match="slots"):
        rules.Custom(max_and_decay, slots=1.5)


def test_other_threads_use_the_cache_while_fn_runs(rng):
    """fn takes the GIL back inside the cache's lock; other threads must not hold the GIL while they
    wait for that lock (they would deadlock)."""
    shape = (1, 2, 2, 8, 8, 4, 0)
    cache = make(shape)
    q, k, v = data(rng, shape, 1)
    done = threading.Event()
    errors = []

    def feed():
        try:
            for _ in range(300):
                cache.update(k, v)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    def read():
        try:
            while not done.is_set():
                assert cache.length[0] >= 0 and cache.nbytes > 0
                cache.visible()
                cache.copy()
                cache.attend(q[:, :, 0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors
    assert cache.length.tolist() == [300]
