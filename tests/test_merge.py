"""rules.Merge in the C++ cache against kvfold.reference beyond test_reference's paths: long visible
sets, narrow storage, state operations, with and without the log-count bias (which attention adds
on every SIMD backend)."""

import pickle

import numpy as np
import pytest

import kvfold
from conftest import close, make_cache, shape_tokens
from kvfold import reference, rules


@pytest.mark.parametrize("rule", [rules.Merge(80), rules.Merge(5), rules.Merge(80, bias=None)], ids=repr)
@pytest.mark.parametrize("dims", [(33, 17), (64, 64)], ids=str)
def test_long_visible_sets_match_reference(rule, dims, rng):
    """Slots and window past one block of rows: the bias goes through the online softmax too. (The
    incremental reference, which equals the history one under fifo retention, keeps this fast.)"""
    dk, dv = dims
    shape = (2, 2, 8, dk, dv, 70, 3)
    cache, ref = make_cache(rule, shape), make_cache(rule, shape, reference.StreamCache)
    q, k, v = shape_tokens(rng, shape, 200)
    close(cache.forward(q, k, v), ref.forward(q, k, v))
    if rule.bias:
        assert cache.visible_size == 3 + rule.slots + 70  # every slot full, merged slots among them


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("rule", [rules.Merge(4), rules.Merge(4, bias=None)], ids=repr)
def test_half_storage_is_the_float32_model_on_rounded_pairs(rule, dtype, rng):
    """Pairs are stored (rounded) before they are folded, and a slot is its float64 mean rounded once."""
    from test_half import ROUND

    shape = (2, 3, 6, 32, 64, 9, 2)
    q, k, v = shape_tokens(rng, shape, 40)
    half, wide = make_cache(rule, shape, dtype=dtype), make_cache(rule, shape)
    a = half.forward(q, k, v)
    b = wide.forward(q, ROUND[dtype](k), ROUND[dtype](v))
    for x, y in zip(half.memory() + half.visible()[:2], wide.memory() + wide.visible()[:2]):
        np.testing.assert_array_equal(x, ROUND[dtype](y))
    assert np.abs(a - b).max() < 2e-2


def test_equal_keys_merge_into_one_slot_weighing_their_count(rng):
    """The log-count bias makes n equal keys in one slot weigh what the n pairs would."""
    pool = rng.standard_normal((1, 2, 4, 16)).astype(np.float32)
    k = pool[:, :, rng.integers(0, 4, 50)]
    v = rng.standard_normal((1, 2, 50, 8)).astype(np.float32)
    q = rng.standard_normal((1, 4, 16)).astype(np.float32)
    merged = kvfold.MemoryCache(rules.Merge(4), num_heads=2, head_dim=16, value_dim=8, num_query_heads=4)
    full = kvfold.MemoryCache(None, num_heads=2, head_dim=16, value_dim=8, num_query_heads=4, window=50)
    merged.update(k, v)
    full.update(k, v)
    close(merged.attend(q), full.attend(q))


@pytest.mark.one_backend
@pytest.mark.parametrize("rule", [rules.Merge(3), rules.Merge(2, bias=None)], ids=repr)
def test_state_operations_continue_like_the_original(rule, rng):
    shape = (3, 2, 4, 8, 6, 3, 1)
    q, k, v = shape_tokens(rng, shape, 30)
    cache, ref = make_cache(rule, shape), make_cache(rule, shape, reference.ReferenceCache)
    cache.forward(q[:, :, :12], k[:, :, :12], v[:, :, :12])
    ref.forward(q[:, :, :12], k[:, :, :12], v[:, :, :12])
    cp = cache.checkpoint()
    saved = cache.to_bytes()
    cache.forward(q[:, :, 12:20], k[:, :, 12:20], v[:, :, 12:20])
    cache.rollback(cp)
    restored = kvfold.MemoryCache.from_bytes(saved)
    assert restored.rule == rule and pickle.loads(pickle.dumps(cache)).rule == rule
    want = ref.forward(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:])
    for c in (cache, restored, cache.copy()):
        close(c.copy().forward(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:]), want)
    # reorder: new row r is old row order[r]; the rows continue as those rows would
    order = [2, 0, 0]
    moved = restored.copy()
    moved.reorder(np.array(order))
    close(moved.forward(q[order][:, :, 12:], k[order][:, :, 12:], v[order][:, :, 12:]), want[order])
    joined = kvfold.MemoryCache.concat([restored.select([1]), restored.select([0])])
    close(joined.forward(q[[1, 0]][:, :, 12:], k[[1, 0]][:, :, 12:], v[[1, 0]][:, :, 12:]), want[[1, 0]])


@pytest.mark.parametrize("rope", [None, kvfold.RoPE(100.0)], ids=["plain", "rope"])
def test_a_loaded_state_folds_exactly_like_the_original(rope, rng):
    """The key directions, cosines and largest cosines a fold keeps are not saved but rebuilt from the
    sums: merges keep choosing the same pairs. Keys from a few directions at several lengths make
    many cosines equal, so the choice rests on the ties and the float64 check."""
    directions = rng.standard_normal((2, 3, 4, 16))
    lengths = rng.integers(1, 4, (2, 3, 160))
    k = (directions[:, :, rng.integers(0, 4, 160)] * lengths[..., None]).astype(np.float32)
    k[:, :, ::7] = rng.standard_normal((2, 3, 23, 16))  # and some keys of their own
    v = rng.standard_normal((2, 3, 160, 8)).astype(np.float32)
    q = rng.standard_normal((2, 6, 160, 16)).astype(np.float32)
    cache = kvfold.MemoryCache(
        rules.Merge(6), num_heads=3, head_dim=16, value_dim=8, num_query_heads=6, batch_size=2, window=5, rope=rope
    )
    cache.forward(q[:, :, :60], k[:, :, :60], v[:, :, :60])
    loaded = kvfold.MemoryCache.from_bytes(cache.to_bytes())
    a = cache.forward(q[:, :, 60:], k[:, :, 60:], v[:, :, 60:])
    b = loaded.forward(q[:, :, 60:], k[:, :, 60:], v[:, :, 60:])
    np.testing.assert_array_equal(a, b)
    for x, y in zip(cache.memory(), loaded.memory()):
        np.testing.assert_array_equal(x, y)
    assert cache.to_bytes() == loaded.to_bytes()
    ref = reference.StreamCache(
        rules.Merge(6), num_heads=3, head_dim=16, value_dim=8, num_query_heads=6, batch_size=2, window=5, rope=rope
    )
    ref.forward(q, k, v)
    for x, y in zip(cache.memory(), ref.memory()):
        close(x, y)


@pytest.mark.one_backend
def test_nbytes_is_fixed_and_counts_the_sums():
    cache = kvfold.MemoryCache(rules.Merge(4), num_heads=2, head_dim=8, value_dim=8, window=2)
    before = cache.nbytes
    cache.update(np.ones((1, 2, 50, 8)), np.ones((1, 2, 50, 8)))
    assert cache.nbytes == before
    drop = kvfold.MemoryCache(None, num_heads=2, head_dim=8, value_dim=8, window=2).nbytes
    assert before - drop >= 2 * 5 * 16 * 8  # float64 sums of 4 slots and the pair being folded, per lane


@pytest.mark.one_backend
def test_bad_slots_are_refused():
    with pytest.raises(ValueError, match=r"merge rule: slots must be an integer in \[1, 65536\], got 0$"):
        rules.Merge(0)
    with pytest.raises(ValueError, match=r"slots must be an integer in \[1, 65536\], got 100000$"):
        rules.Merge(100000)


@pytest.mark.parametrize(
    "slots, keys",
    [
        (2, [[1, 0], [0, 1], [1, 1]]),  # an exact tie: (0, 2) comes before (1, 2)
        (3, [[1, 0], [0, 1], [0, 3], [-1, 0.1]]),  # slots 1 and 2 merge, slot 3 moves down
        (2, [[1, 0], [-1, 0], [0, 0]]),  # a zero key has cosine 0 with both
        (2, [[1, 0], [1, 1e-4], [1, 2e-4], [0, 1]]),  # cosines 1 - 5e-9 apart: float64 decides
        (3, [[1, 0], [2, 0], [0, 1], [0, 5], [1, 1], [3, 3], [-1, 0]]),  # several exact ties of cosine 1
    ],
)
def test_merge_choices_by_hand(slots, keys):
    k = np.array(keys, np.float32)[None, None]
    v = np.arange(len(keys), dtype=np.float32)[None, None, :, None]
    cache = kvfold.MemoryCache(rules.Merge(slots), num_heads=1, head_dim=2, value_dim=1)
    ref = reference.StreamCache(rules.Merge(slots), num_heads=1, head_dim=2, value_dim=1)
    cache.update(k, v)
    ref.update(k, v)
    for a, b in zip(cache.memory(), ref.memory()):
        close(a, b)


def near_three_directions(rng, n):
    pool = rng.standard_normal((3, 4))
    return pool[rng.integers(0, 3, n)] + 1e-2 * rng.standard_normal((n, 4))


def scattered(rng, n):
    """The most similar of a few random 16-dimensional keys still point well apart."""
    return rng.standard_normal((n, 16))


@pytest.mark.parametrize("keys", [near_three_directions, scattered])
@pytest.mark.parametrize("slots", [2, 3, 8])
def test_many_merges_keep_the_float64_choices(slots, keys, rng):
    """Merged hundreds of times, the slots merge the pair the float64 reference does (the values,
    token numbers, tell which pairs merged): with keys near three directions many cosines are within
    float16 rounding of each other, and a merged slot's cosines come from its parents'; with
    scattered keys, now and then a merged slot's parents point so far apart that their cosines would
    bound its own too loosely, and it is scored again."""
    n = 400
    k = keys(rng, n).astype(np.float32)[None, None]
    v = np.arange(n, dtype=np.float32)[None, None, :, None]
    d = k.shape[-1]
    cache = kvfold.MemoryCache(rules.Merge(slots), num_heads=1, head_dim=d, value_dim=1)
    ref = reference.StreamCache(rules.Merge(slots), num_heads=1, head_dim=d, value_dim=1)
    for t in range(0, n, 50):
        cache.update(k[:, :, t : t + 50], v[:, :, t : t + 50])
        ref.update(k[:, :, t : t + 50], v[:, :, t : t + 50])
        np.testing.assert_allclose(cache.memory()[1], ref.memory()[1], rtol=1e-5)
