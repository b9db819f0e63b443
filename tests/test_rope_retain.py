"""RoPE-aware folding (rope=, positions=) and attention-chosen retention (retain="tova"/"h2o") in the
C++ cache, against kvfold.reference.StreamCache, through every path and state operation."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

import kvfold
from conftest import make_cache as make
from conftest import shape_tokens as data
from conftest import tokens
from kvfold import RoPE, reference, rules
from rule_cases import ROPE

SUMMARY = ROPE
# (the last: a scaled RoPE's own frequencies, as RoPE.from_config reads them for llama3 or yarn)
ROPES = [None, RoPE(10000.0), RoPE(100.0, dim=4, layout="interleaved"), RoPE(100.0, dim=4, frequencies=(0.9, 0.02))]
RETAINS = [("fifo", None), ("tova", None), ("h2o", None), ("h2o", 1)]

# (batch, KV heads, query heads, d_k, d_v, window, sinks)
SHAPES = [
    (1, 1, 1, 8, 3, 4, 0),
    (2, 2, 6, 6, 5, 3, 1),
    (3, 1, 2, 4, 4, 0, 2),
]
T = 24


def positions(rng, B, T, start=0):
    """Non-decreasing positions with repeats and jumps, per row."""
    return start + np.cumsum(rng.choice([0, 1, 1, 2, 7], size=(B, T)), axis=1)


def close(a, b, tol=1e-5):
    assert_allclose(a, b, rtol=tol, atol=tol)


def same_state(cache, ref, tol=1e-5):
    for a, b in zip(cache.memory() + cache.visible()[:2], ref.memory() + ref.visible()[:2]):
        close(a, b, tol)
    np.testing.assert_array_equal(cache.visible()[2], ref.visible()[2])
    np.testing.assert_array_equal(cache.length, ref.length)


def options(rope, retain, recent):
    return dict(rope=rope, retain=retain, recent=recent)


@pytest.mark.parametrize("rule", SUMMARY, ids=repr)
@pytest.mark.parametrize("rope", ROPES, ids=repr)
@pytest.mark.parametrize("retain", RETAINS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_step_matches_stream_model(rule, rope, retain, shape, rng):
    if rope is not None and rope.dim is None and shape[3] % 2:
        pytest.skip("a RoPE over an odd head")
    kw = options(rope, *retain)
    if retain[1] is not None and retain[1] > shape[5]:  # recent beyond the window: both refuse it
        for cls in (kvfold.MemoryCache, reference.StreamCache):
            with pytest.raises(ValueError, match="recent"):
                make(rule, shape, cls, **kw)
        return
    cache, ref = make(rule, shape, **kw), make(rule, shape, reference.StreamCache, **kw)
    q, k, v = data(rng, shape, T)
    p = positions(rng, shape[0], T)
    for t in range(T):
        close(
            cache.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]),
            ref.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]),
        )
    same_state(cache, ref)


MEMORIES = [
    (rules.Merge(3), RoPE(10000.0), "tova", None),
    (rules.Merge(2), None, "h2o", None),
    (rules.Cumulative(), RoPE(50.0, dim=4), "h2o", 1),
    (rules.Compressive(2, 2), RoPE(10000.0, layout="interleaved"), "fifo", None),
    (rules.Moving(2), None, "tova", None),
    (rules.Merge(2), RoPE(10000.0, dim=4, frequencies=(0.6, 0.003)), "fifo", None),
]
SHAPE = (2, 2, 4, 6, 5, 3, 1)


def memory_case(memory, rng):
    """A MEMORIES entry's rule and cache options, with tokens and positions for SHAPE (drawn in that order)."""
    rule, rope, retain, recent = memory
    q, k, v = data(rng, SHAPE, T)
    return rule, options(rope, retain, recent), q, k, v, positions(rng, SHAPE[0], T)


@pytest.mark.parametrize("memory", MEMORIES, ids=str)
def test_forward_equals_steps_and_blocks_match_the_model(memory, rng):
    rule, kw, q, k, v, p = memory_case(memory, rng)
    stepped, whole = make(rule, SHAPE, **kw), make(rule, SHAPE, **kw)
    steps = np.stack([stepped.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]) for t in range(T)], axis=2)
    close(whole.forward(q, k, v, positions=p), steps, 1e-6)
    same_state(whole, stepped, 1e-6)
    # update of a block, then attend: the block's pairs are unscored, so retention keeps the newest
    cache, ref = make(rule, SHAPE, **kw), make(rule, SHAPE, reference.StreamCache, **kw)
    for lo, hi in [(0, 5), (5, 6), (6, 15), (15, T)]:
        cache.update(k[:, :, lo:hi], v[:, :, lo:hi], positions=p[:, lo:hi])
        ref.update(k[:, :, lo:hi], v[:, :, lo:hi], positions=p[:, lo:hi])
        close(cache.attend(q[:, :, hi - 1]), ref.attend(q[:, :, hi - 1]))
    same_state(cache, ref)


def test_default_positions_are_tokens_seen(rng):
    kw = options(RoPE(100.0), "tova", None)
    q, k, v = data(rng, SHAPE, T)
    given, default = make(rules.Merge(2), SHAPE, **kw), make(rules.Merge(2), SHAPE, **kw)
    seen = np.broadcast_to(np.arange(T), (SHAPE[0], T))
    close(default.forward(q, k, v), given.forward(q, k, v, positions=seen), 0)
    assert default.to_bytes() == given.to_bytes()


@pytest.mark.one_backend
@pytest.mark.parametrize("memory", MEMORIES, ids=str)
def test_state_operations_mid_stream_continue_the_run(memory, rng, tmp_path):
    _, rope, retain, _ = memory
    rule, kw, q, k, v, p = memory_case(memory, rng)
    half = T // 2

    def run(cache, lo, hi):
        return [cache.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]) for t in range(lo, hi)]

    whole = make(rule, SHAPE, **kw)
    expected = run(whole, 0, T)
    cache = make(rule, SHAPE, **kw)
    run(cache, 0, half)
    point = cache.checkpoint()
    run(cache, half, T - 2)  # wander off, then come back
    cache.rollback(point)
    cache.save(tmp_path / "state.kvfold")
    for restored in (
        cache.copy(),
        kvfold.MemoryCache.from_bytes(cache.to_bytes()),
        kvfold.load(tmp_path / "state.kvfold"),
    ):
        assert restored.rope == rope and restored.retain == retain
        for got, want in zip(run(restored, half, T), expected[half:]):
            close(got, want, 0)
        assert restored.to_bytes() == whole.to_bytes()


@pytest.mark.one_backend
@pytest.mark.parametrize("memory", MEMORIES, ids=str)
def test_a_state_with_unscored_pairs_round_trips(memory, rng, tmp_path):
    # update() enters pairs that no query has scored yet; a state saved then must load and go on
    # as the original does.
    rule, kw, q, k, v, p = memory_case(memory, rng)
    cache = make(rule, SHAPE, **kw)
    cache.update(k[:, :, :7], v[:, :, :7], positions=p[:, :7])
    cache.save(tmp_path / "state.kvfold")
    restored = [kvfold.MemoryCache.from_bytes(cache.to_bytes()), kvfold.load(tmp_path / "state.kvfold")]
    for c in [cache, *restored]:
        c.update(k[:, :, 7:9], v[:, :, 7:9], positions=p[:, 7:9])
    expected = [cache.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]) for t in range(9, T)]
    for c in restored:
        for t, want in zip(range(9, T), expected):
            close(c.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]), want, 0)
        assert c.to_bytes() == cache.to_bytes()


@pytest.mark.one_backend
@pytest.mark.parametrize("memory", MEMORIES, ids=str)
def test_reorder_select_concat_match_the_model(memory, rng):
    rule, kw, q, k, v, p = memory_case(memory, rng)
    cache, ref = make(rule, SHAPE, **kw), make(rule, SHAPE, reference.StreamCache, **kw)
    for t in range(T // 2):
        cache.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t])
        ref.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t])
    order = [1, 0]
    cache.reorder(order)
    ref.reorder(order)
    joined = kvfold.MemoryCache.concat([cache.select([0]), cache.select([1])])
    for t in range(T // 2, T):
        args = (q[order, :, t], k[order, :, t], v[order, :, t])
        want = ref.step(*args, positions=p[order, t])
        close(cache.step(*args, positions=p[order, t]), want)
        close(joined.step(*args, positions=p[order, t]), want)
    same_state(cache, ref)
    assert joined.to_bytes() == cache.to_bytes()


def rounded(x, dtype):
    """x as a storage dtype holds it (round to nearest even), back in float32."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "memory",
    [
        (rules.Drop(), None, "tova", None),
        (rules.Drop(), RoPE(100.0), "h2o", None),
        (rules.Merge(2), RoPE(100.0), "fifo", None),
    ],
    ids=str,
)
def test_storage_dtypes_match_the_model(dtype, memory, rng):
    """Pairs stored in 16 bits: the model fed the same rounded pairs; slots round once more."""
    rule, kw, q, k, v, p = memory_case(memory, rng)
    k, v = rounded(k, dtype), rounded(v, dtype)
    cache, ref = make(rule, SHAPE, dtype=dtype, **kw), make(rule, SHAPE, reference.StreamCache, **kw)
    tol = 1e-5 if isinstance(rule, rules.Drop) else 3e-2
    # The avx512bf16 kernels score bfloat16 keys against the query rounded to bfloat16 (vdpbf16ps).
    q_read = rounded(q, dtype) if dtype == "bfloat16" and kvfold.simd_backend() == "avx512bf16" else q
    for t in range(T):
        close(
            cache.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]),
            ref.step(q_read[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]),
            tol,
        )
    same_state(cache, ref, tol)


def test_long_windows_record_the_weights_of_every_block(rng):
    """Visible sets longer than one attention block (512 rows) record TOVA weights across blocks."""
    shape = (1, 2, 4, 16, 8, 1100, 4)
    kw = options(RoPE(10000.0), "tova", None)
    q, k, v = data(rng, shape, 1150)
    p = positions(rng, 1, 1150)
    cache, ref = make(rules.Merge(8), shape, **kw), make(rules.Merge(8), shape, reference.StreamCache, **kw)
    for t in range(1150):
        close(
            cache.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]),
            ref.step(q[:, :, t], k[:, :, t], v[:, :, t], positions=p[:, t]),
        )
    same_state(cache, ref)


MERGE = rules.Merge(2)


def core_cache(rope=None, retain="fifo", recent=-1, rule=MERGE, head_dim=8, window=4):
    """The core's constructor, below the Python checks: what a C++ caller could pass."""
    return kvfold._core.MemoryCache(
        rule._spec(), 1, 1, head_dim, 4, 1, window, 0, 0.0, "float32", True, rope=rope, retain=retain, recent=recent
    )


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "kw, error, words",
    [
        (dict(rope=(0.0 - 1.0, 0, "half")), ValueError, "theta must be a finite number > 0, got -1"),
        (dict(rope=(float("inf"), 0, "half")), ValueError, "theta must be a finite number > 0, got inf"),
        (dict(rope=(1e4, 10, "half")), ValueError, "dim must be at most head_dim=8 (0 for the whole head), got dim=10"),
        (dict(rope=(1e4, 3, "half")), ValueError, "dim must be even"),
        (dict(rope=(1e4, 0, "half"), head_dim=7), ValueError, "needs an even head_dim, got 7"),
        (dict(rope=(1e4, 0, "diagonal")), ValueError, "layout must be 'half' or 'interleaved', got 'diagonal'"),
        (dict(rope=(1e4, 0, "half", (1.0, 0.5))), ValueError, "frequencies: expected 4 values (one per pair of the 8"),
        (dict(rope=(1e4, 4, "half", (1.0, float("inf")))), ValueError, "frequencies[1] must be finite, got inf"),
        (dict(rope=(0.0, 0, "half", (1.0,) * 4)), ValueError, "expected dim 0, the half layout and no frequencies"),
        (dict(rope=(1e4, 0)), TypeError, "rope: expected (theta, dim, layout[, frequencies]), got 2 items"),
        (dict(retain="lru"), ValueError, "retain: expected one of 'fifo', 'tova', 'h2o', got 'lru'"),
        (dict(retain="h2o", recent=5), ValueError, "recent: expected an integer in [0, window=4], got 5"),
        (dict(retain="h2o", recent=-2), ValueError, "recent: expected an integer in [0, window=4], got -2"),
        (dict(retain="tova", recent=1), ValueError, "only retain='h2o' keeps a recent part, got recent=1"),
        (dict(rope=(1e4, 0, "half"), rule=rules.Compressive(2, 2, pool="max")), ValueError, "not averages"),
        (dict(rope=(1e4, 0, "half"), rule=rules.Linear()), ValueError, "the linear rule are not averages"),
        (dict(retain="tova", rule=rules.Linear()), ValueError, "retain: 'tova'"),
        (dict(retain="h2o", rule=rules.Delta(beta=0.5)), ValueError, "expected retain='fifo' with this rule"),
    ],
    ids=str,
)
def test_bad_options_are_refused_by_the_core(kw, error, words):
    with pytest.raises(error) as e:
        core_cache(**kw)
    assert words in str(e.value)


@pytest.mark.one_backend
def test_bad_options_are_refused_by_the_python_class():
    with pytest.raises(TypeError, match="rope: expected a kvfold.RoPE or None, got tuple"):
        kvfold.MemoryCache(rules.Merge(2), 1, 8, rope=(1e4, 0, "half"))
    with pytest.raises(ValueError, match="theta must be a finite number > 0"):
        RoPE(0.0)
    with pytest.raises(TypeError, match="retain: expected 'fifo', 'tova' or 'h2o', got int"):
        kvfold.MemoryCache(rules.Merge(2), 1, 8, retain=1)
    with pytest.raises(ValueError, match=r"recent: expected an integer in \[0, window=4\], got 9"):
        kvfold.MemoryCache(rules.Merge(2), 1, 8, window=4, retain="h2o", recent=9)
    with pytest.raises(ValueError, match="rope: the slots of the gru rule are not averages"):
        gru = rules.GRU(np.zeros((3 * 16, 16)), np.zeros((3 * 16, 16)))
        kvfold.MemoryCache(gru, 1, 8, rope=RoPE(1e4))
    with pytest.raises(ValueError, match="retain: 'h2o'"):
        kvfold.MemoryCache(rules.Custom(lambda k, v, nk, nv, i: (k, v)), 1, 8, retain="h2o")
    with pytest.raises(ValueError, match="rope: dim must be at most head_dim=8"):
        kvfold.MemoryCache(rules.Merge(2), 1, 8, rope=RoPE(1e4, dim=10))


@pytest.mark.one_backend
def test_bad_positions_change_nothing(rng):
    B, H, dk = 2, 2, 6
    cache = kvfold.MemoryCache(rules.Merge(2), H, dk, batch_size=B, window=2, rope=RoPE(100.0), retain="tova")
    k, v, q = tokens(rng, B, H, 3, dk), tokens(rng, B, H, 3, dk), tokens(rng, B, H, 3, dk)
    cache.forward(q, k, v, positions=[[0, 4, 9], [1, 1, 2]])
    before = cache.to_bytes()
    one = (k[:, :, 0], v[:, :, 0])
    cases = [
        (lambda: cache.update(*one, positions=[8, 5]), ValueError, "positions: row 0 goes backwards, from 9 to 8"),
        (lambda: cache.update(*one, positions=[9, -1]), ValueError, "positions: expected integers >= 0, got -1"),
        (
            lambda: cache.update(*one, positions=np.array([9, 2**64 - 1], np.uint64)),
            ValueError,
            "positions: expected integers up to 2\\^63 - 1, got 18446744073709551615",
        ),
        (
            lambda: cache.update(*one, positions=[2**63, 2**63]),
            ValueError,
            "positions: expected integers up to 2\\^63 - 1, got 9223372036854775808",
        ),
        (
            lambda: cache.update(*one, positions=[9.0, 5.0]),
            TypeError,
            "positions: expected integers, got dtype float64",
        ),
        (lambda: cache.update(*one, positions=[True, True]), TypeError, "positions: expected integers, got dtype bool"),
        (
            lambda: cache.update(*one, positions=[9]),
            ValueError,
            r"positions: expected shape \(2,\) for one token, got \(1,\)",
        ),
        (
            lambda: cache.update(*one, positions=[[9], [5]]),
            ValueError,
            r"expected shape \(2,\) for one token, got \(2, 1\)",
        ),
        (
            lambda: cache.update(k, v, positions=[9, 9, 9]),
            ValueError,
            r"expected shape \(2, 3\) for a block, got \(3,\)",
        ),
        (
            lambda: cache.update(k, v, positions=[[9, 10, 9], [5, 6, 7]]),
            ValueError,
            "row 0 goes backwards, from 10 to 9",
        ),
        (lambda: cache.step(q[:, :, 0], *one, positions=[[9, 5]]), ValueError, "for one token"),
        (
            lambda: cache.forward(q, k, v, positions=[[9, 9, 9], [0, 1, 2]]),
            ValueError,
            "row 1 goes backwards, from 2 to 0",
        ),
        (lambda: cache.update(*one, positions="ab"), TypeError, "positions: expected integers"),
        # without positions, each row's next is its tokens seen (3), behind row 0's latest (9)
        (lambda: cache.update(*one), ValueError, "positions: row 0 goes backwards, from 9 to 3"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()
        assert cache.to_bytes() == before
    cache.update(*one, positions=np.array([9, 2], dtype=np.uint8))  # equal positions are allowed
    assert cache.length.tolist() == [4, 4]


@pytest.mark.one_backend
def test_format_version_1_states_still_load(rng):
    """A state written before RoPE and retention (format version 1) loads as fifo, without a RoPE,
    each row's last position its tokens seen minus one."""
    import struct
    import zlib

    B, H, dk = 2, 2, 4
    cache = kvfold.MemoryCache(rules.Cumulative(), H, dk, batch_size=B, window=2, sinks=1)
    q, k, v = tokens(rng, B, H, 5, dk), tokens(rng, B, H, 5, dk), tokens(rng, B, H, 5, dk)
    cache.forward(q, k, v)
    new = cache.to_bytes()
    config_end = 24 + 7 * 8 + 8 + 2  # header, then the version 1 configuration
    rule = 4 + len("cumulative") + 4 + 4  # kind, no arrays, no options
    lengths = config_end + 26 + rule
    old = bytearray(new[:config_end] + new[config_end + 26 : lengths + 8 * B] + new[lengths + 16 * B : -4])
    old[8:12] = struct.pack("<I", 1)
    old[16:24] = struct.pack("<Q", len(old) + 4)
    old = bytes(old) + struct.pack("<I", zlib.crc32(old))
    loaded = kvfold.MemoryCache.from_bytes(old)
    assert loaded.retain == "fifo" and loaded.rope is None
    assert loaded.last_position.tolist() == [4, 4]
    assert loaded.to_bytes() == new
    close(loaded.step(q[:, :, 0], k[:, :, 0], v[:, :, 0]), cache.step(q[:, :, 0], k[:, :, 0], v[:, :, 0]), 0)


@pytest.mark.one_backend
def test_a_rope_with_its_own_frequencies_is_format_version_4(rng):
    """Frequencies equal to theta's give theta's run; only a state that has them is written as version 4,
    so every other state stays readable by the kvfold versions that read up to 3."""
    theta = RoPE(100.0, dim=4)
    own = RoPE(100.0, dim=4, frequencies=(1.0, 0.1))  # 100 ** (-2 i / 4)
    q, k, v = data(rng, SHAPE, T)
    p = positions(rng, SHAPE[0], T)
    a, b = make(rules.Merge(2), SHAPE, rope=theta), make(rules.Merge(2), SHAPE, rope=own)
    close(a.forward(q, k, v, positions=p), b.forward(q, k, v, positions=p), 1e-6)
    assert a.to_bytes()[8] == 3 and b.to_bytes()[8] == 4
    loaded = kvfold.MemoryCache.from_bytes(b.to_bytes())
    assert loaded.rope == own and loaded.to_bytes() == b.to_bytes()
    with pytest.raises(ValueError) as e:
        kvfold.MemoryCache.concat([a, b])
    assert "like caches[0], got rope=RoPE(theta=100, dim=4, layout='half', frequencies=(1, 0.1))" in str(e.value)
