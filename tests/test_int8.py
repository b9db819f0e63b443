"""int8 storage (q8_0: 32 values per float32 scale): about a quarter of the float32 bytes, exactly the
float32 model on rounded pairs, scores of the query rounded the same way, and an accuracy against the
float32 cache that docs/performance.md quotes."""

import numpy as np
import pytest

import kvfold
from kvfold import rules
from test_half import RULES, attend_visible, cache, round_q8, stream


def lane_bytes(rows, d):
    """Bytes of one lane of a buffer of int8 rows of d values, with the 64-byte alignment of a lane."""
    n = rows * 36 * (-(-d // 32))
    return -(-n // 64) * 64


def test_storage_bytes():
    wide, narrow = cache(rules.Drop(), "float32"), cache(rules.Drop(), "int8")
    lengths = 16 * wide.batch_size  # the per-row token counts and last positions stay int64
    lanes = 2 * 3
    sinks_and_window = lanes * sum(lane_bytes(rows, d) for rows in (2, 9) for d in (32, 64))
    assert narrow.nbytes - lengths == sinks_and_window
    assert narrow.nbytes - lengths < (wide.nbytes - lengths) * 0.34  # 36/128 of the bytes, and lane alignment
    # The memory slots shrink too; a rule's own state (Moving's float64 sums and ring of pairs) stays.
    a, b = cache(rules.Moving(4), "float32"), cache(rules.Moving(4), "int8")
    slots = lanes * ((32 + 64) * 4 - lane_bytes(1, 32) - lane_bytes(1, 64))  # one slot per lane
    assert a.nbytes - b.nbytes == (wide.nbytes - narrow.nbytes) + slots
    # A GRU's slot is its hidden state: it stays float32.
    n = 32 + 64
    gru = rules.GRU(np.zeros((3 * n, n), np.float32), np.zeros((3 * n, n), np.float32))
    a, b = cache(gru, "float32"), cache(gru, "int8")
    assert a.nbytes - b.nbytes == wide.nbytes - narrow.nbytes


def test_rounding_is_q8_0():
    """Each block of 32 values: scale max|x| / 127, codes rounded to nearest; odd sizes pad the last block."""
    x = np.array([[0.0, 1.0, -2.0, 0.5, 127.0, -0.25, 3.0]], np.float32)
    c = kvfold.MemoryCache(None, num_heads=1, head_dim=7, value_dim=7, window=1, dtype="int8")
    c.update(x[None, :, None], x[None, :, None])
    keys, values, _ = c.visible()
    np.testing.assert_array_equal(keys[0, 0, 0], [0.0, 1.0, -2.0, 0.0, 127.0, -0.0, 3.0])  # step 1: 0.5 ties to 0
    np.testing.assert_array_equal(values, keys)
    np.testing.assert_array_equal(keys[0, 0], round_q8(x))


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_int8_storage_is_the_float32_model_on_rounded_pairs(rule):
    """Every pair is stored (sink or window) before anything reads or folds it, and a slot is the float32
    rule's slot rounded once: an int8 cache holds exactly what a float32 cache fed the rounded pairs holds,
    rounded. It attends with the query rounded the same way, block by block."""
    q, k, v = stream(3)
    narrow, wide = cache(rule, "int8"), cache(rule, "float32")
    narrow.forward(q, k, v)
    wide.forward(q, round_q8(k), round_q8(v))
    pooled_in_place = isinstance(rule, rules.Compressive) and rule.pool == "max"
    for a, b in zip(narrow.memory() + narrow.visible()[:2], wide.memory() + wide.visible()[:2]):
        if pooled_in_place:  # the open slot's max is taken in place: each fold rounds it again, on a new step
            np.testing.assert_allclose(a, round_q8(b), rtol=0, atol=2 * np.abs(b).max() / 127)
        else:
            np.testing.assert_array_equal(a, round_q8(b))
    last = q[:, :, -1]
    want = attend_visible(narrow, round_q8(last))
    np.testing.assert_allclose(narrow.attend(last), want, rtol=1e-5, atol=1e-6)
    # Against the unrounded query, the rounding of the query shows.
    assert np.abs(narrow.attend(last) - attend_visible(narrow, last)).max() > 1e-6


# The L2 error of each output vector against the float32 cache's, relative to its norm, for unit normal
# keys, values and queries: median and largest (docs/performance.md quotes the measured figures).
MEDIAN, LARGEST = 1e-2, 4e-2


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_accuracy_against_float32(rule):
    q, k, v = stream(4, T=200)
    a = cache(rule, "int8", window=64, sinks=4).forward(q, k, v)
    b = cache(rule, "float32", window=64, sinks=4).forward(q, k, v)
    relative = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.median(relative) <= MEDIAN
    assert relative.max() <= LARGEST
    assert np.median(relative) > 1e-3  # the storage really is narrower


def test_accuracy_at_model_sizes():
    """head_dim 128, a window of 256 and 32 heads: the median stays within the bound."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 8, 300, 128), dtype=np.float32)
    k = rng.standard_normal((1, 4, 300, 128), dtype=np.float32)
    v = rng.standard_normal((1, 4, 300, 128), dtype=np.float32)
    kw = dict(num_heads=4, head_dim=128, num_query_heads=8, window=256, sinks=4)
    a = kvfold.MemoryCache(None, dtype="int8", **kw).forward(q, k, v)
    b = kvfold.MemoryCache(None, **kw).forward(q, k, v)
    relative = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
    assert 1e-3 < np.median(relative) <= MEDIAN


def test_large_values_are_stored_and_nonfinite_ones_refused():
    """Every finite float32 has a scale: nothing overflows. NaN and Inf are refused as for every dtype."""
    c = kvfold.MemoryCache(rules.Cumulative(), 2, 4, window=2, dtype="int8")
    k = np.ones((1, 2, 1, 4), np.float32)
    k[0, 1, 0, 2] = 3e38
    c.update(k, k)
    assert c.visible()[0][0, 1, 0, 2] == np.float32(3e38) / np.float32(127) * np.float32(127)
    before = c.to_bytes()
    k[0, 1, 0, 2] = np.inf
    with pytest.raises(ValueError, match="k: expected finite values, got Inf"):
        c.update(k, k)
    assert c.to_bytes() == before
    unchecked = kvfold.MemoryCache(rules.Cumulative(), 2, 4, window=2, dtype="int8", check_finite=False)
    unchecked.update(k, k)  # the caller opted out of the check: the block reads as NaN
    keys = unchecked.visible()[0]
    assert np.isnan(keys[0, 1, 0]).all() and np.isfinite(keys[0, 0, 0]).all()


def test_dtype_is_checked_and_kept():
    with pytest.raises(ValueError, match="dtype: expected 'float32', 'float16', 'bfloat16' or 'int8', got 'int4'"):
        kvfold.MemoryCache(None, 2, 4, dtype="int4")
    c = kvfold.MemoryCache(rules.EMA(0.5), 2, 4, window=3, sinks=1, dtype="int8")
    assert c.dtype == "int8" and "dtype='int8'" in repr(c)
    c.update(*(np.ones((1, 2, 6, 4), np.float32),) * 2)
    back = kvfold.MemoryCache.from_bytes(c.to_bytes())
    assert back.dtype == "int8" and back.to_bytes() == c.to_bytes()
