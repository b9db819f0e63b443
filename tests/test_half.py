"""float16 / bfloat16 storage: half the bytes, exactly the float32 model on rounded pairs, and an
accuracy against the float32 cache that docs/performance.md quotes."""

import numpy as np
import pytest

import kvfold
from kvfold import rules
from rule_cases import SUMMARY


def round_bf16(x):
    """float32 -> nearest bfloat16 (ties to even), as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return r.view(np.float32)


def round_q8(x):
    """float32 rows (last axis) -> int8 blocks of 32 with a float32 scale each (q8_0), as float32: what
    an int8 cache stores, bit for bit."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[-1]
    pad = -d % 32
    blocks = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], (d + pad) // 32, 32)
    scale = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    codes = np.rint(blocks * inverse)
    return (codes * scale).astype(np.float32).reshape(*x.shape[:-1], d + pad)[..., :d]


ROUND = {"float16": lambda x: x.astype(np.float16).astype(np.float32), "bfloat16": round_bf16, "int8": round_q8}
# Merge chooses the slots it merges by reading them as stored: test_merge.py has its own check
RULES = [r for r in SUMMARY if not isinstance(r, rules.Merge)]


def cache(rule, dtype, **kw):
    cfg = dict(num_heads=3, head_dim=32, value_dim=64, num_query_heads=6, batch_size=2, window=9, sinks=2)
    cfg.update(kw)
    return kvfold.MemoryCache(rule, dtype=dtype, **cfg)


def stream(seed, T=40):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((2, 6, T, 32), dtype=np.float32),
        rng.standard_normal((2, 3, T, 32), dtype=np.float32),
        rng.standard_normal((2, 3, T, 64), dtype=np.float32),
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_bytes_halve(dtype):
    wide, narrow = cache(rules.Drop(), "float32"), cache(rules.Drop(), dtype)
    lengths = 16 * wide.batch_size  # the per-row token counts and last positions stay int64
    assert narrow.nbytes - lengths == (wide.nbytes - lengths) // 2
    # The memory slots halve too; a rule's own state (Moving's float64 sums and ring of pairs) stays.
    slot_bytes = 2 * 3 * (32 + 64) * 4  # one float32 slot per lane
    a, b = cache(rules.Moving(4), "float32"), cache(rules.Moving(4), dtype)
    assert a.nbytes - b.nbytes == (wide.nbytes - lengths) // 2 + slot_bytes // 2
    # A GRU's slot is its hidden state: it stays float32.
    n = 32 + 64
    gru = rules.GRU(np.zeros((3 * n, n), np.float32), np.zeros((3 * n, n), np.float32))
    a, b = cache(gru, "float32"), cache(gru, dtype)
    assert a.nbytes - b.nbytes == (wide.nbytes - lengths) // 2


def attend_visible(c, q):
    """Softmax attention of q (B, Hq, d_k) over the cache's visible set, in float64. The avx512bf16
    kernels score bfloat16 keys against the query rounded to bfloat16 (vdpbf16ps), so there the
    query is rounded first."""
    if c.dtype == "bfloat16" and kvfold.simd_backend() == "avx512bf16":
        q = round_bf16(q)
    keys, values, mask = (np.asarray(x, np.float64) if x.dtype != bool else x for x in c.visible())
    group = q.shape[1] // keys.shape[1]
    keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
    s = np.einsum("bhd,bhnd->bhn", q.astype(np.float64), keys) * c.scale
    s = np.where(mask[:, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhn,bhnd->bhd", p / p.sum(-1, keepdims=True), values)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_half_storage_is_the_float32_model_on_rounded_pairs(rule, dtype):
    """With a window, every pair is stored (sink or window) before anything reads or folds it, and a
    slot is the float32 rule's slot rounded once: a half-precision cache holds exactly what a float32
    cache fed the rounded pairs holds, rounded, and attends over it in float32."""
    q, k, v = stream(3)
    half, wide = cache(rule, dtype), cache(rule, "float32")
    half.forward(q, k, v)
    wide.forward(q, ROUND[dtype](k), ROUND[dtype](v))
    for a, b in zip(half.memory(), wide.memory()):
        np.testing.assert_array_equal(a, ROUND[dtype](b))
    for a, b in zip(half.visible()[:2], wide.visible()[:2]):
        np.testing.assert_array_equal(a, ROUND[dtype](b))
    last = q[:, :, -1]
    np.testing.assert_allclose(half.attend(last), attend_visible(half, last), rtol=1e-5, atol=1e-6)


# Bounds on the error against the float32 cache: the L2 error of each output vector relative to its
# norm, for unit normal keys, values and queries (docs/performance.md quotes the measured figures).
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
