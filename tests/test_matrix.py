"""Matrix memories (the linear-attention family) against kvfold.reference, and their laws."""

import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import kvfold
from conftest import SHAPES
from kvfold import reference, rules


@dataclass
class Case:
    name: str
    rule: Callable[[int, int, int], rules.Rule]  # (H, Hq, d_k) -> rule
    decay: Optional[str] = None  # per-token decay: None, "head" or "key"
    beta: bool = False  # per-token beta

    def __repr__(self) -> str:
        return self.name


def const_decay(H, dk=None):
    """Deterministic log-space decays in [-0.6, -0.02]: (H,) or (H, d_k)."""
    shape = (H,) if dk is None else (H, dk)
    return -0.02 - 0.58 * (np.arange(np.prod(shape)).reshape(shape) % 7) / 6


CASES = [
    Case("linear", lambda H, Hq, dk: rules.Linear()),
    Case("linear-elu1-normalized", lambda H, Hq, dk: rules.Linear("elu1", normalize=True, mix=0.7)),
    Case("linear-relu", lambda H, Hq, dk: rules.Linear("relu", mix=-1.0)),
    Case("gated-token-head", lambda H, Hq, dk: rules.Gated(), decay="head"),
    Case("gated-token-key", lambda H, Hq, dk: rules.Gated(mix=np.linspace(-2, 2, Hq)), decay="key"),
    Case("gated-const-head", lambda H, Hq, dk: rules.Gated(decay=const_decay(H))),
    Case("gated-const-key", lambda H, Hq, dk: rules.Gated(decay=const_decay(H, dk))),
    Case("delta-token", lambda H, Hq, dk: rules.Delta(), beta=True),
    Case("delta-const-scalar", lambda H, Hq, dk: rules.Delta(beta=0.5, mix=1.5)),
    Case("gated_delta-token-key", lambda H, Hq, dk: rules.GatedDelta(), decay="key", beta=True),
    Case("gated_delta-token-head", lambda H, Hq, dk: rules.GatedDelta(), decay="head", beta=True),
    Case("gated_delta-const", lambda H, Hq, dk: rules.GatedDelta(decay=const_decay(H), beta=np.linspace(0.2, 0.9, H))),
    Case("gated_delta-const-key-token-beta", lambda H, Hq, dk: rules.GatedDelta(decay=const_decay(H, dk)), beta=True),
]

# conftest's shapes and a wide value dimension
SHAPES = [*SHAPES, (1, 2, 2, 17, 127, 0, 0)]

T = 17


def make(case, shape, cls=kvfold.MemoryCache):
    B, H, Hq, dk, dv, window, sinks = shape
    return cls(
        case.rule(H, Hq, dk),
        num_heads=H,
        head_dim=dk,
        value_dim=dv,
        num_query_heads=Hq,
        batch_size=B,
        window=window,
        sinks=sinks,
    )


def data(rng, case, shape, T):
    """q, unit-norm k (so the delta rules stay stable), v, and the per-token gates the case needs."""
    B, H, Hq, dk, dv, _, _ = shape
    q = rng.standard_normal((B, Hq, T, dk)).astype(np.float32)
    k = rng.standard_normal((B, H, T, dk))
    k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
    v = rng.standard_normal((B, H, T, dv)).astype(np.float32)
    gates = {}
    if case.decay:
        shape_g = (B, H, T) if case.decay == "head" else (B, H, T, dk)
        gates["decay"] = (-0.5 * rng.random(shape_g)).astype(np.float32)
    if case.beta:
        gates["beta"] = rng.uniform(0.1, 1.0, (B, H, T)).astype(np.float32)
    return q, k, v, gates


def at(gates, t):
    return {name: g[:, :, t] for name, g in gates.items()}


def span(gates, lo, hi):
    return {name: g[:, :, lo:hi] for name, g in gates.items()}


def close(a, b):
    assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def memories(cache):
    m = cache.memory()
    return m if isinstance(m, tuple) else (m,)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_step_matches_reference(case, shape, rng):
    cache, ref = make(case, shape), make(case, shape, reference.ReferenceCache)
    q, k, v, gates = data(rng, case, shape, T)
    assert cache.matrix_memory and cache.memory_slots == 0
    for t in range(T):
        close(
            cache.step(q[:, :, t], k[:, :, t], v[:, :, t], **at(gates, t)),
            ref.step(q[:, :, t], k[:, :, t], v[:, :, t], **at(gates, t)),
        )
    for mine, theirs in zip(memories(cache), memories(ref)):
        close(mine, theirs)
    ck, cv, cm = cache.visible()  # [sinks | window]: a matrix memory has no slots
    rk, rv, rm = ref.visible()
    close(ck, rk)
    close(cv, rv)
    np.testing.assert_array_equal(cm, rm)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("shape", SHAPES[1:6], ids=str)
def test_blocks_and_forward_match_reference(case, shape, rng):
    cache, ref = make(case, shape), make(case, shape, reference.ReferenceCache)
    q, k, v, gates = data(rng, case, shape, T)
    for lo, hi in [(0, 1), (1, 6), (6, 11)]:
        cache.update(k[:, :, lo:hi], v[:, :, lo:hi], **span(gates, lo, hi))
        ref.update(k[:, :, lo:hi], v[:, :, lo:hi], **span(gates, lo, hi))
        close(cache.attend(q[:, :, hi - 1]), ref.attend(q[:, :, hi - 1]))
    # a single token in the block form's 3-D shapes
    cache.update(k[:, :, 11], v[:, :, 11], **at(gates, 11))
    ref.update(k[:, :, 11], v[:, :, 11], **at(gates, 11))
    close(
        cache.forward(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], **span(gates, 12, T)),
        ref.forward(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], **span(gates, 12, T)),
    )
    for mine, theirs in zip(memories(cache), memories(ref)):
        close(mine, theirs)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[9]], ids=repr)
def test_rows_diverge_after_reset(case, rng):
    shape = (3, 2, 4, 5, 6, 3, 1)
    cache, ref = make(case, shape), make(case, shape, reference.ReferenceCache)
    q, k, v, gates = data(rng, case, shape, 20)
    cache.update(k[:, :, :9], v[:, :, :9], **span(gates, 0, 9))
    ref.update(k[:, :, :9], v[:, :, :9], **span(gates, 0, 9))
    cache.reset(rows=[1])
    ref.reset(rows=[1])
    close(
        cache.forward(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], **span(gates, 9, 20)),
        ref.forward(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], **span(gates, 9, 20)),
    )
    np.testing.assert_array_equal(cache.length, [20, 11, 20])


@st.composite
def setups(draw):
    H = draw(st.sampled_from([1, 2, 3]))
    return dict(
        case=draw(st.sampled_from(CASES)),
        shape=(
            draw(st.integers(1, 3)),
            H,
            H * draw(st.sampled_from([1, 2, 4])),
            draw(st.sampled_from([1, 3, 7, 17, 33])),
            draw(st.sampled_from([1, 3, 7, 17, 33])),
            draw(st.integers(0, 6)),
            draw(st.integers(0, 3)),
        ),
    )


@contextmanager
def chunks(n):
    """Blocks run in chunks of n tokens inside the block."""
    before = kvfold.get_chunk_size()
    kvfold.set_chunk_size(n)
    try:
        yield
    finally:
        kvfold.set_chunk_size(before)


def alike(a, b):
    """Two caches fed the same tokens, one in blocks (chunked), one token by token: lengths, sinks
    and window exactly alike, the matrix memory alike to float rounding."""
    np.testing.assert_array_equal(a.length, b.length)
    for x, y in zip(a.visible(), b.visible()):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(memories(a), memories(b)):
        assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def chunked_examples(test):
    """A property over random setups, token counts T, chunk sizes and seeds."""
    chunk = st.sampled_from([1, 2, 3, 5, 8, 64])
    test = given(cfg=setups(), T=st.integers(1, 30), chunk=chunk, seed=st.integers(0, 2**31))(test)
    return settings(max_examples=40, deadline=None)(test)


def two_caches(cfg, T, seed):
    """T tokens (q, k, v, gates) of the seed and two empty caches of the setup."""
    case, shape = cfg["case"], cfg["shape"]
    return data(np.random.default_rng(seed), case, shape, T), make(case, shape), make(case, shape)


@chunked_examples
def test_forward_is_a_loop_of_step(cfg, T, chunk, seed):
    """forward takes the block in chunks, step one token at a time: alike to float rounding."""
    (q, k, v, gates), a, b = two_caches(cfg, T, seed)
    outs = np.stack([b.step(q[:, :, t], k[:, :, t], v[:, :, t], **at(gates, t)) for t in range(T)], axis=2)
    with chunks(chunk):
        assert_allclose(a.forward(q, k, v, **gates), outs, rtol=1e-4, atol=1e-5)
    alike(a, b)


@chunked_examples
def test_block_update_is_a_loop_of_single_updates(cfg, T, chunk, seed):
    (_, k, v, gates), a, b = two_caches(cfg, T, seed)
    with chunks(chunk):
        a.update(k, v, **gates)
    for t in range(T):
        b.update(k[:, :, t], v[:, :, t], **at(gates, t))
    alike(a, b)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("shape", [(2, 2, 4, 17, 9, 0, 0), (1, 2, 2, 33, 16, 5, 2)], ids=str)
def test_chunk_size_changes_nothing_but_rounding(case, shape, rng):
    """Long blocks (more chunks than one, sizes that do not divide T) against the token loop."""
    T = 150
    q, k, v, gates = data(rng, case, shape, T)
    steps = make(case, shape)
    want = np.stack([steps.step(q[:, :, t], k[:, :, t], v[:, :, t], **at(gates, t)) for t in range(T)], axis=2)
    for chunk in (1, 7, 64, 256):
        cache = make(case, shape)
        with chunks(chunk):
            cache.update(k[:, :, :20], v[:, :, :20], **span(gates, 0, 20))
            out = cache.forward(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], **span(gates, 20, T))
        assert_allclose(out, want[:, :, 20:], rtol=1e-4, atol=1e-5)
        alike(cache, steps)


@pytest.mark.parametrize("case", [CASES[4], CASES[9]], ids=repr)
def test_strong_per_key_decays(case, rng):
    """Per-key decays that add up to far more than a float's range within one chunk (the chunk is
    then cut where the decay factors would leave [e^-30, e^30]), a reset (-90) and no decay at all (0)."""
    shape, T = (1, 2, 2, 16, 8, 0, 0), 120
    q, k, v, gates = data(rng, case, shape, T)
    g = -rng.uniform(0, 6, gates["decay"].shape).astype(np.float32)
    g[:, :, ::9, :4] = 0.0
    g[:, 1, 50, :] = -90
    gates["decay"] = g
    steps = make(case, shape)
    want = np.stack([steps.step(q[:, :, t], k[:, :, t], v[:, :, t], **at(gates, t)) for t in range(T)], axis=2)
    cache = make(case, shape)
    out = cache.forward(q, k, v, **gates)
    assert np.isfinite(out).all()
    assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    alike(cache, steps)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_blocks_fold_the_window_pairs_as_stored(dtype, rng):
    """With half-precision storage a pair leaves the window rounded; a block folds it so too."""
    case, shape = CASES[9], (1, 2, 2, 9, 5, 4, 1)
    q, k, v, gates = data(rng, case, shape, 40)
    kw = dict(num_heads=2, head_dim=9, value_dim=5, window=4, sinks=1, dtype=dtype)
    steps, blocks = kvfold.MemoryCache(rules.GatedDelta(), **kw), kvfold.MemoryCache(rules.GatedDelta(), **kw)
    want = np.stack([steps.step(q[:, :, t], k[:, :, t], v[:, :, t], **at(gates, t)) for t in range(40)], axis=2)
    with chunks(3):
        out = np.concatenate(
            [
                blocks.forward(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], **span(gates, lo, hi))
                for lo, hi in [(0, 2), (2, 13), (13, 40)]
            ],
            axis=2,
        )
    assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    alike(blocks, steps)


@pytest.mark.one_backend
def test_chunk_size_is_set_and_read():
    before = kvfold.get_chunk_size()
    try:
        for n in (1, 17, kvfold._core.MAX_CHUNK):
            kvfold.set_chunk_size(n)
            assert kvfold.get_chunk_size() == n
    finally:
        kvfold.set_chunk_size(before)


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "value, error, words",
    [
        (0, ValueError, ["chunk_size", "[1, 256]", "got 0"]),
        (257, ValueError, ["chunk_size", "got 257"]),
        (2**70, ValueError, ["chunk_size", str(2**70)]),
        (8.0, TypeError, ["chunk_size", "integer", "float"]),
        (True, TypeError, ["chunk_size", "bool"]),
    ],
)
def test_bad_chunk_sizes_are_refused(value, error, words):
    before = kvfold.get_chunk_size()
    with pytest.raises(error) as info:
        kvfold.set_chunk_size(value)
    for w in words:
        assert w in str(info.value)
    assert kvfold.get_chunk_size() == before


def test_window_gates_travel_with_their_tokens(rng):
    """A token's gates apply when it leaves the window, not the gates of the token that pushes it out."""
    shape = (1, 1, 1, 4, 3, 2, 0)
    case = CASES[9]  # gated delta, per-token per-key decay and beta
    q, k, v, gates = data(rng, case, shape, 6)
    cache = make(case, shape)
    cache.update(k, v, **gates)
    # folded: tokens 0..3 with their own gates, from S = 0
    S = np.zeros((4, 3))
    for t in range(4):
        S, _ = reference.matrix_fold(
            rules.GatedDelta(),
            S[None],
            None,
            k[0, :, t].astype(np.float64),
            v[0, :, t].astype(np.float64),
            gates["decay"][0, :, t],
            gates["beta"][0, :, t],
        )
        S = S[0]
    close(cache.memory()[0, 0], S)


def test_matrix_memory_state_round_trips(rng):
    case = CASES[9]
    shape = (2, 2, 4, 5, 3, 3, 1)
    q, k, v, gates = data(rng, case, shape, 12)
    cache = make(case, shape)
    cache.update(k[:, :, :8], v[:, :, :8], **span(gates, 0, 8))
    for other in (kvfold.MemoryCache.from_bytes(cache.to_bytes()), cache.copy()):
        assert other.rule == cache.rule
        np.testing.assert_array_equal(
            other.forward(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], **span(gates, 8, 12)),
            cache.copy().forward(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], **span(gates, 8, 12)),
        )


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]], ids=repr)
def test_load_memory_sets_the_state(case, rng):
    shape = (2, 2, 4, 5, 3, 2, 1)
    q, k, v, gates = data(rng, case, shape, 10)
    cache, ref = make(case, shape), make(case, shape, reference.ReferenceCache)
    for c in (cache, ref):
        c.update(k[:, :, :4], v[:, :, :4], **span(gates, 0, 4))
    S = rng.standard_normal((2, 2, 5, 3)).astype(np.float32)
    z = rng.random((2, 2, 5)).astype(np.float32) + 1
    state = (S, z) if case.rule(2, 4, 5) == rules.Linear("elu1", normalize=True, mix=0.7) else (S,)
    cache.load_memory(*state)
    ref.load_memory(*state)
    for mine, loaded in zip(memories(cache), state):
        np.testing.assert_array_equal(mine, loaded)
    close(
        cache.forward(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], **span(gates, 4, 10)),
        ref.forward(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], **span(gates, 4, 10)),
    )


def test_nbytes_never_grows(rng):
    cache = kvfold.MemoryCache(rules.GatedDelta(), num_heads=2, head_dim=8, window=16, sinks=2)
    before = cache.nbytes
    assert before >= 2 * 8 * 8 * 4 + 2 * 16 * (8 + 2) * 4  # S, and the window's gates beside its pairs
    k = rng.standard_normal((1, 2, 1000, 8), dtype=np.float32) / 3
    g = -rng.random((1, 2, 1000), dtype=np.float32)
    b = rng.random((1, 2, 1000), dtype=np.float32)
    for _ in range(20):
        cache.update(k, k, decay=g, beta=b)
    assert cache.length[0] == 20_000 and cache.nbytes == before
    assert np.isfinite(cache.memory()).all()


def test_empty_matrix_cache_attends_to_zeros():
    cache = kvfold.MemoryCache(rules.Linear(), num_heads=2, head_dim=3, window=2, batch_size=2)
    assert not cache.attend(np.ones((2, 2, 3))).any()


def test_rules_round_trip_through_saved_state(rng):
    for rule in [
        rules.Linear("relu", normalize=True, eps=1e-3, mix=(0.5, -0.5)),
        rules.Gated(decay=const_decay(2, 3)),
        rules.Delta(beta=0.25),
        rules.GatedDelta(decay=(-0.1, -0.2), beta=(0.3, 0.4), mix=2.0),
    ]:
        cache = kvfold.MemoryCache(rule, num_heads=2, head_dim=3, window=1)
        back = pickle.loads(pickle.dumps(cache))
        assert back.rule == rule and hash(back.rule) == hash(rule)
    assert repr(rules.GatedDelta(decay=(-0.1, -0.2), beta=0.5)) == "GatedDelta(decay=(-0.1, -0.2), beta=0.5, mix=0.0)"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_storage_dtype_applies_to_sinks_and_window_only(dtype, rng):
    """S stays float32: without sinks and window a half-precision cache computes exactly the same."""
    case, shape = CASES[9], (2, 2, 4, 9, 5, 0, 0)
    q, k, v, gates = data(rng, case, shape, 12)
    kw = dict(num_heads=2, head_dim=9, value_dim=5, num_query_heads=4, batch_size=2)
    full = kvfold.MemoryCache(rules.GatedDelta(), **kw)
    half = kvfold.MemoryCache(rules.GatedDelta(), dtype=dtype, **kw)
    np.testing.assert_array_equal(half.forward(q, k, v, **gates), full.forward(q, k, v, **gates))
    windowed = kvfold.MemoryCache(rules.GatedDelta(), dtype=dtype, window=3, sinks=1, **kw)
    ref = reference.ReferenceCache(rules.GatedDelta(), window=3, sinks=1, **kw)
    assert_allclose(windowed.forward(q, k, v, **gates), ref.forward(q, k, v, **gates), rtol=2e-2, atol=2e-2)
