"""float16 / bfloat16 storage: half the bytes, exactly the float32 model on rounded pairs, and an
accuracy against the float32 cache that the README quotes."""

import numpy as np
import pytest

import kvfold
from kvfold import rules


def round_bf16(x):
    """float32 -> nearest bfloat16 (ties to even), as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return r.view(np.float32)


ROUND = {"float16": lambda x: x.astype(np.float16).astype(np.float32), "bfloat16": round_bf16}
RULES = [rules.Drop(), rules.Cumulative(), rules.EMA(0.3), rules.Compressive(2, 3, "max")]


def cache(rule, dtype, **kw):
    cfg = dict(num_heads=3, head_dim=32, value_dim=64, num_query_heads=6, batch_size=2, window=9, sinks=2)
    cfg.update(kw)
    return kvfold.MemoryCache(rule, dtype=dtype, **cfg)


def stream(seed, T=40):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 6, T, 32), dtype=np.float32), rng.standard_normal((2, 3, T, 32), dtype=np.float32),
            rng.standard_normal((2, 3, T, 64), dtype=np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_bytes_halve(dtype):
    wide, narrow = cache(rules.Drop(), "float32"), cache(rules.Drop(), dtype)
    lengths = 8 * wide.batch_size  # the per-row token counts stay int64
    assert narrow.nbytes - lengths == (wide.nbytes - lengths) // 2
    # Rules keep their own state in float32 / float64: only sinks and window halve.
    a, b = cache(rules.Moving(4), "float32"), cache(rules.Moving(4), dtype)
    assert a.nbytes - b.nbytes == (wide.nbytes - lengths) // 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_half_storage_is_the_float32_model_on_rounded_pairs(rule, dtype):
    """With a window, every pair is stored (sink or window) before anything reads or folds it, so a
    half-precision cache is exactly a float32 cache fed the rounded pairs."""
    q, k, v = stream(3)
    half, wide = cache(rule, dtype), cache(rule, "float32")
    a = half.forward(q, k, v)
    b = wide.forward(q, ROUND[dtype](k), ROUND[dtype](v))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(half.memory()[1], wide.memory()[1], rtol=1e-6, atol=1e-7)


# Bounds on the error against the float32 cache: the L2 error of each output vector relative to its
# norm, for unit normal keys, values and queries (the README quotes the measured figures).
BOUNDS = {"float16": 1e-3, "bfloat16": 1e-2}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_accuracy_against_float32(rule, dtype):
    q, k, v = stream(4, T=200)
    a = cache(rule, dtype, window=64, sinks=4).forward(q, k, v)
    b = cache(rule, "float32", window=64, sinks=4).forward(q, k, v)
    relative = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
    assert relative.max() <= BOUNDS[dtype]
    assert relative.max() > 0  # the storage really is narrower
