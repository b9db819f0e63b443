"""Laws the model must obey, checked over random configurations."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import kvfold
from kvfold import rules
from rule_cases import SUMMARY

SIZES = st.sampled_from([1, 3, 7, 17, 33])
RULE = st.sampled_from(SUMMARY)


@st.composite
def setups(draw):
    H = draw(st.sampled_from([1, 2, 3]))
    return dict(
        rule=draw(RULE),
        num_heads=H,
        num_query_heads=H * draw(st.sampled_from([1, 2, 4])),
        head_dim=draw(SIZES),
        value_dim=draw(SIZES),
        batch_size=draw(st.integers(1, 3)),
        window=draw(st.integers(0, 6)),
        sinks=draw(st.integers(0, 3)),
    )


def inputs(seed, cfg, T):
    rng = np.random.default_rng(seed)
    B, H, Hq = cfg["batch_size"], cfg["num_heads"], cfg["num_query_heads"]
    q = rng.standard_normal((B, Hq, T, cfg["head_dim"]), dtype=np.float32)
    k = rng.standard_normal((B, H, T, cfg["head_dim"]), dtype=np.float32)
    v = rng.standard_normal((B, H, T, cfg["value_dim"]), dtype=np.float32)
    return q, k, v


@settings(max_examples=40, deadline=None)
@given(cfg=setups(), T=st.integers(1, 30), seed=st.integers(0, 2**31))
def test_forward_is_a_loop_of_step(cfg, T, seed):
    q, k, v = inputs(seed, cfg, T)
    a, b = kvfold.MemoryCache(**cfg), kvfold.MemoryCache(**cfg)
    outs = np.stack([b.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(T)], axis=2)
    np.testing.assert_array_equal(a.forward(q, k, v), outs)
    assert a.to_bytes() == b.to_bytes()


@pytest.mark.parametrize("head_dim", [64, 100, 128, 256])
@pytest.mark.parametrize("group", [1, 2])
def test_forward_is_a_loop_of_step_over_a_long_window(head_dim, group):
    """Over a window longer than a short visible set, a decode step and a block give the same bits."""
    cfg = dict(
        rule=rules.Cumulative(),
        num_heads=2,
        num_query_heads=2 * group,
        head_dim=head_dim,
        value_dim=head_dim,
        batch_size=1,
        window=100,
        sinks=2,
    )
    T = 140
    q, k, v = inputs(head_dim + group, cfg, T)
    a, b = kvfold.MemoryCache(**cfg), kvfold.MemoryCache(**cfg)
    outs = np.stack([b.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(T)], axis=2)
    np.testing.assert_array_equal(a.forward(q, k, v), outs)
    assert a.to_bytes() == b.to_bytes()


@settings(max_examples=40, deadline=None)
@given(cfg=setups(), T=st.integers(1, 30), seed=st.integers(0, 2**31))
def test_block_update_is_a_loop_of_single_updates(cfg, T, seed):
    _, k, v = inputs(seed, cfg, T)
    a, b = kvfold.MemoryCache(**cfg), kvfold.MemoryCache(**cfg)
    a.update(k, v)
    for t in range(T):
        b.update(k[:, :, t], v[:, :, t])
    assert a.to_bytes() == b.to_bytes()


def causal_attention(q, k, v, scale, group):
    B, Hq, T, _ = q.shape
    out = np.zeros((B, Hq, T, v.shape[-1]))
    for hq in range(Hq):
        s = scale * np.einsum("btd,bsd->bts", q[:, hq].astype(np.float64), k[:, hq // group].astype(np.float64))
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, hq] = (w / w.sum(-1, keepdims=True)) @ v[:, hq // group]
    return out


@settings(max_examples=30, deadline=None)
@given(cfg=setups(), T=st.integers(1, 40), extra=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_window_covering_the_stream_is_full_causal_attention(cfg, T, extra, seed):
    cfg = dict(cfg, rule=rules.Drop(), window=max(T - cfg["sinks"], 0) + extra)
    q, k, v = inputs(seed, cfg, T)
    cache = kvfold.MemoryCache(**cfg)
    group = cfg["num_query_heads"] // cfg["num_heads"]
    assert_allclose(cache.forward(q, k, v), causal_attention(q, k, v, cache.scale, group), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(cfg=setups(), T=st.integers(1, 60), seed=st.integers(0, 2**31))
def test_cumulative_memory_is_the_mean_of_folded_pairs(cfg, T, seed):
    cfg = dict(cfg, rule=rules.Cumulative())
    _, k, v = inputs(seed, cfg, T)
    cache = kvfold.MemoryCache(**cfg)
    cache.update(k, v)
    folded = max(T - cfg["sinks"] - cfg["window"], 0)
    mk, mv = cache.memory()
    if folded == 0:
        assert not mk.any() and not mv.any()
    else:
        lo = cfg["sinks"]
        assert_allclose(mk[:, :, 0], k[:, :, lo : lo + folded].astype(np.float64).mean(axis=2), rtol=1e-5, atol=1e-6)
        assert_allclose(mv[:, :, 0], v[:, :, lo : lo + folded].astype(np.float64).mean(axis=2), rtol=1e-5, atol=1e-6)


ONE_SLOT = [
    rules.Cumulative(),
    rules.Moving(3),
    rules.Weighted((1.0, 3.0)),
    rules.EMA(0.2),
    rules.Compressive(1, 2),
    rules.Compressive(1, 3, "max"),
    rules.Merge(1),
]


@settings(max_examples=30, deadline=None)
@given(
    rule=st.sampled_from(ONE_SLOT),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    cfg=setups(),
    T=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_a_lone_slot_is_read_as_stored_by_every_query_head(rule, dtype, cfg, T, seed):
    """With window 0, no sinks and one slot, each step's visible set is the slot alone: softmax gives it
    weight 1, so every query head of a KV head reads the slot's value exactly as the cache holds it."""
    cfg = dict(cfg, rule=rule, dtype=dtype, window=0, sinks=0)
    q, k, v = inputs(seed, cfg, T)
    cache = kvfold.MemoryCache(**cfg)
    group = cfg["num_query_heads"] // cfg["num_heads"]
    for t in range(T):
        out = cache.step(q[:, :, t], k[:, :, t], v[:, :, t])
        _, values = cache.memory()
        np.testing.assert_array_equal(out, np.repeat(values[:, :, 0], group, axis=1))


def test_nbytes_never_grows():
    rng = np.random.default_rng(0)
    for rule in [rules.Cumulative(), rules.Moving(16), rules.Compressive(4, 8), rules.Drop()]:
        cache = kvfold.MemoryCache(rule, num_heads=2, head_dim=8, window=16, sinks=2)
        before = cache.nbytes
        k = rng.standard_normal((1, 2, 1000, 8), dtype=np.float32)
        for _ in range(100):
            cache.update(k, k)
        assert cache.length[0] == 100_000
        assert cache.nbytes == before
