"""The NumPy model itself (kvfold.reference): RoPE, Merge, positions and retention, against cases
computed by hand and against laws that tie it to plain attention."""

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

import kvfold
from kvfold import RoPE, reference, rules
from kvfold.reference import MergeSlots, ReferenceCache, StreamCache, rotate
from rule_cases import ROPE, SUMMARY

pytestmark = pytest.mark.one_backend  # NumPy only: no kernel runs


def close(a, b):
    assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def data(rng, B, H, Hq, T, dk, dv):
    return (rng.standard_normal((B, Hq, T, dk)), rng.standard_normal((B, H, T, dk)), rng.standard_normal((B, H, T, dv)))


# -- RoPE ---------------------------------------------------------------------------------------


def rotate_half_hf(x, p, theta):
    """Hugging Face Llama's formula: x * cos + rotate_half(x) * sin, cos/sin of (p * inv_freq) repeated twice."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    angle = np.concatenate([p * inv, p * inv])
    half = np.concatenate([-x[d // 2 :], x[: d // 2]])
    return x * np.cos(angle) + half * np.sin(angle)


def test_rope_half_is_hugging_face_rotate_half(rng):
    x = rng.standard_normal(16)
    for p in (0, 1, 7, 1000):
        close(rotate(RoPE(10000.0), x, p), rotate_half_hf(x, p, 10000.0))


def test_rope_interleaved_is_a_complex_rotation(rng):
    x = rng.standard_normal(8)
    p, theta = 5, 100.0
    z = (x[0::2] + 1j * x[1::2]) * np.exp(1j * p * theta ** (-2.0 * np.arange(4) / 8))
    y = rotate(RoPE(theta, layout="interleaved"), x, p)
    close(y[0::2], z.real)
    close(y[1::2], z.imag)


def test_rope_by_hand():
    # d = 2: one pair, inv_freq = theta^0 = 1, so position p turns (1, 0) by p radians
    close(rotate(RoPE(10000.0), np.array([1.0, 0.0]), 1), [math.cos(1), math.sin(1)])
    # d = 4, half layout: pairs (0, 2) turn by p, (1, 3) by p / 100 (theta = 10^4)
    y = rotate(RoPE(10000.0), np.array([1.0, 1.0, 0.0, 0.0]), 2)
    close(y, [math.cos(2), math.cos(0.02), math.sin(2), math.sin(0.02)])


@pytest.mark.parametrize("rope", [RoPE(10000.0), RoPE(500.0, layout="interleaved"), RoPE(1e5, dim=6)], ids=repr)
def test_rope_round_trip_partial_dims_and_relative_positions(rope, rng):
    x, q = rng.standard_normal((3, 10)), rng.standard_normal(10)
    p = np.array([0.0, 3.5, 1234.25])  # fractional positions too (a slot's mean position)
    close(rotate(rope, rotate(rope, x, p), -p), x)
    if rope.dim is not None:
        close(rotate(rope, x, p)[:, rope.dim :], x[:, rope.dim :])
    # scores depend on the relative position only
    close(rotate(rope, x, p) @ rotate(rope, q, 50.0), rotate(rope, x, p - 50.0) @ q)


def test_rope_parameters_are_checked():
    with pytest.raises(ValueError, match="theta must be a finite number > 0, got 0"):
        RoPE(0)
    with pytest.raises(ValueError, match="theta must be a finite number > 0"):
        RoPE(float("inf"))
    with pytest.raises(TypeError, match="theta must be a real number"):
        RoPE("1e4")
    with pytest.raises(ValueError, match="dim must be even"):
        RoPE(1e4, dim=7)
    with pytest.raises(ValueError, match="layout must be 'half' or 'interleaved', got 'neox'"):
        RoPE(1e4, layout="neox")
    with pytest.raises(ValueError, match="dim must be at most head_dim=8, got dim=10"):
        StreamCache(None, num_heads=1, head_dim=8, rope=RoPE(1e4, dim=10))
    with pytest.raises(ValueError, match="whole head needs an even head_dim"):
        ReferenceCache(None, num_heads=1, head_dim=7, rope=RoPE(1e4))
    assert RoPE(1e4, 8) == RoPE(10000, dim=8) and repr(RoPE(2)) == "RoPE(theta=2.0, dim=None, layout='half')"


@pytest.mark.parametrize(
    "rule",
    [
        rules.GRU(np.zeros((12, 4)), np.zeros((12, 4))),
        rules.Compressive(2, 2, pool="max"),
        rules.Custom(lambda mk, mv, k, v, i: (mk, mv)),
        rules.Linear(),
    ],
    ids=lambda r: type(r).__name__,
)
def test_rules_without_positions_refuse_rope(rule):
    for cls in (ReferenceCache, StreamCache):
        if cls is StreamCache and rule.matrix:
            continue
        with pytest.raises(ValueError, match="rope: the slots of .* are not averages of folded pairs"):
            cls(rule, num_heads=1, head_dim=2, rope=RoPE(1e4))


def test_rope_from_a_hugging_face_config():
    class Config:
        rope_parameters = {"rope_theta": 100000.0, "rope_type": "default"}
        head_dim, hidden_size, num_attention_heads = 64, 576, 9

    assert RoPE.from_config(Config()) == RoPE(100000.0)
    for kind in ("dynamic", "longrope"):  # (the other scaled types are read through transformers: test_hf_attention)
        Config.rope_parameters = {"rope_theta": 5e5, "rope_type": kind}
        with pytest.raises(ValueError, match=f"rope_type '{kind}' changes the frequencies with the sequence length"):
            RoPE.from_config(Config())
    Config.rope_parameters = {"rope_theta": 5e5, "rope_type": "default"}
    assert RoPE.from_config(Config(), "full_attention") == RoPE(5e5)  # one RoPE for every layer type
    # a RoPE per layer type (Gemma 3)
    Config.rope_parameters = {
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
        "full_attention": {"rope_theta": 1e6, "rope_type": "default", "partial_rotary_factor": 0.5},
    }
    assert RoPE.from_config(Config(), "full_attention") == RoPE(1e6, dim=32)
    assert RoPE.from_config(Config(), layer_type="sliding_attention") == RoPE(1e4)
    for bad in (None, "chunked_attention"):
        with pytest.raises(ValueError, match=r"layer_type: .* \['full_attention', 'sliding_attention'\], got"):
            RoPE.from_config(Config(), bad)


def test_rope_frequencies_replace_theta(rng):
    x, p = rng.standard_normal((3, 10)), np.array([0.0, 3.5, 1234.25])
    theta = RoPE(1e4, dim=6)
    own = RoPE(1e4, dim=6, frequencies=[1e4 ** (-2 * i / 6) for i in range(3)])
    close(rotate(own, x, p), rotate(theta, x, p))
    scaled = RoPE(1e4, dim=6, frequencies=np.array([0.5, 0.25, 0.0]))  # a NumPy array, a pair left unturned
    assert scaled.frequencies == (0.5, 0.25, 0.0) and hash(scaled) == hash(RoPE(1e4, 6, "half", (0.5, 0.25, 0)))
    turned = rotate(scaled, x, p)
    close(turned[:, [2, 5]], x[:, [2, 5]])
    close(turned[1, [0, 3]], rotate(RoPE(1e4, dim=2), x[1, [0, 3]], 3.5 * 0.5))  # pair 0 at angle 0.5 p
    close(rotate(scaled, turned, -p), x)
    assert repr(scaled) == "RoPE(theta=10000.0, dim=6, layout='half', frequencies=(0.5, 0.25, 0.0))"


@pytest.mark.parametrize(
    "kw, error, words",
    [
        (dict(frequencies="0.5"), TypeError, "frequencies must be a sequence of real numbers, got str"),
        (dict(frequencies=[[0.5, 0.1]]), TypeError, "got list of shape (1, 2) and dtype float64"),
        (dict(frequencies=[True, False]), TypeError, "and dtype bool"),
        (dict(frequencies=[0.5, None]), TypeError, "and dtype object"),
        (dict(frequencies=[]), ValueError, "frequencies: expected one value per rotated pair, got none"),
        (dict(frequencies=[0.5, float("nan")]), ValueError, "frequencies[1] must be finite, got nan"),
        (dict(dim=4, frequencies=[0.5]), ValueError, "frequencies: expected dim / 2 = 2 values (one per rotated pair)"),
    ],
    ids=str,
)
def test_bad_rope_frequencies_are_refused(kw, error, words):
    with pytest.raises(error) as e:
        RoPE(1e4, **kw)
    assert words in str(e.value)


def test_rope_frequencies_must_fit_the_head():
    for cls in (ReferenceCache, StreamCache):
        with pytest.raises(ValueError, match=r"frequencies: expected head_dim / 2 = 4 values \(one per rotated pair\)"):
            cls(None, num_heads=1, head_dim=8, rope=RoPE(1e4, frequencies=[1.0, 0.5, 0.25]))


# -- Merge --------------------------------------------------------------------------------------


def folded(merge, *keys):
    for i, k in enumerate(keys):
        merge.fold(np.asarray(k, float), np.array([float(i)]), 10 * i)
    return merge.read()


def test_merge_by_hand_ties_go_to_the_first_pair():
    # cos(k0, k1) = 0, cos(k0, k2) = cos(k1, k2) = 0.707: a tie, and (0, 2) comes first in row-major order
    slots = folded(MergeSlots(rules.Merge(2)), [1, 0], [0, 1], [1, 1])
    assert [s[3] for s in slots] == [2, 1]
    close(slots[0][0], [1.0, 0.5])  # (k0 + k2) / 2
    close(slots[0][1], [1.0])  # values 0 and 2
    close(slots[0][2], 10.0)  # positions 0 and 20
    close(slots[1][0], [0, 1])


def test_merge_by_hand_later_slots_move_down():
    # k1 and k2 are the same direction (cosine 1): they merge into slot 1 and k3 moves down to slot 2
    slots = folded(MergeSlots(rules.Merge(3)), [1, 0], [0, 1], [0, 3], [-1, 0.1])
    assert [s[3] for s in slots] == [1, 2, 1]
    close(slots[1][0], [0, 2])
    close(slots[2][0], [-1, 0.1])
    close(slots[2][2], 30.0)
    # a merged slot keeps merging: the mean key decides
    slots = folded(MergeSlots(rules.Merge(1)), [1, 0], [0, 1], [1, 1])
    assert len(slots) == 1 and slots[0][3] == 3
    close(slots[0][0], [2 / 3, 2 / 3])


def test_merge_by_hand_a_zero_key_has_cosine_zero():
    # cos(k0, k1) = -1, and the zero key k2 has cosine 0 with both: (0, 2) is the first largest
    slots = folded(MergeSlots(rules.Merge(2)), [1, 0], [-1, 0], [0, 0])
    assert [s[3] for s in slots] == [2, 1]
    close(slots[0][0], [0.5, 0])


@pytest.mark.parametrize("cls", [ReferenceCache, StreamCache])
@pytest.mark.parametrize("rope", [None, RoPE(100.0), RoPE(10.0, dim=4, layout="interleaved")], ids=repr)
def test_merge_with_room_for_every_pair_keeps_them_exactly(cls, rope, rng):
    T, shape = 9, dict(num_heads=2, head_dim=6, value_dim=3, num_query_heads=4, batch_size=2, sinks=1)
    merge = cls(rules.Merge(T), window=2, rope=rope, **shape)
    full = cls(rules.Drop(), window=T, rope=rope, **shape)
    q, k, v = data(rng, 2, 2, 4, T, 6, 3)
    positions = np.array([np.arange(T) * 3, np.arange(T) + 100])  # any positions: un-rotate, re-rotate
    close(merge.forward(q, k, v, positions=positions), full.forward(q, k, v, positions=positions))
    if cls is StreamCache:
        close(merge.visible_bias(), 0.0)  # ln 1


@pytest.mark.parametrize("cls", [ReferenceCache, StreamCache])
def test_log_count_bias_over_equal_keys_is_attention_over_every_pair(cls, rng):
    """Token Merging's proportional attention: n equal keys weigh as one key with logit + ln n."""
    T, distinct = 40, 5
    pool = rng.standard_normal((1, 2, distinct, 8))
    k = pool[:, :, rng.integers(0, distinct, T)]  # every key is one of 5
    _, _, v = data(rng, 1, 2, 2, T, 8, 4)
    q = rng.standard_normal((1, 2, 8))
    full = cls(rules.Drop(), num_heads=2, head_dim=8, value_dim=4, window=T)
    full.update(k, v)
    for bias in ("log_count", None):
        merged = cls(rules.Merge(distinct, bias=bias), num_heads=2, head_dim=8, value_dim=4)
        merged.update(k, v)
        if bias:
            close(merged.attend(q), full.attend(q))
        else:
            assert np.abs(merged.attend(q) - full.attend(q)).max() > 1e-3


def test_merge_slots_of_every_head_are_their_own(rng):
    q, k, v = data(rng, 1, 3, 3, 12, 4, 2)
    cache = ReferenceCache(rules.Merge(3), num_heads=3, head_dim=4, value_dim=2)
    cache.forward(q, k, v)
    for h in range(3):
        one = ReferenceCache(rules.Merge(3), num_heads=1, head_dim=4, value_dim=2)
        one.forward(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1])
        close(cache.memory()[0][:, h], one.memory()[0][:, 0])


# -- positions and RoPE in the caches -----------------------------------------------------------


ROPE_RULES = ROPE


@pytest.mark.parametrize("rule", ROPE_RULES, ids=repr)
def test_a_slot_reads_its_key_rotated_at_its_averaged_position(rule, rng):
    """The rope cache's visible slots are the plain cache's slots over un-rotated keys, each rotated
    at the slot's position, which is the same average of the positions (an extra value column)."""
    rope, T = RoPE(50.0), 14
    q, k, v = data(rng, 1, 1, 1, T, 4, 2)
    positions = np.cumsum(rng.integers(0, 4, (1, T)), axis=1)
    cache = ReferenceCache(rule, num_heads=1, head_dim=4, value_dim=2, window=3, sinks=1, rope=rope)
    cache.forward(q, k, v, positions=positions)
    unrotated = rotate(rope, k[0, 0], -positions[0])
    folded = range(1, T - 3)  # after the sink, before the window
    plain = reference.fold_memory(rule, [(unrotated[t], np.append(v[0, 0, t], positions[0, t])) for t in folded])
    keys, _, _ = cache.visible()
    assert keys.shape[2] == 1 + len(plain) + 3
    for i, (key, value_and_position) in enumerate(plain):
        close(keys[0, 0, 1 + i], rotate(rope, key, value_and_position[-1]))


def test_cumulative_slot_position_by_hand():
    rope = RoPE(10.0)
    cache = StreamCache(rules.Cumulative(), num_heads=1, head_dim=2, rope=rope)
    k = np.array([[[[1.0, 0.0], [1.0, 0.0]]]])
    k[0, 0, 0], k[0, 0, 1] = rotate(rope, k[0, 0, 0], 2), rotate(rope, k[0, 0, 1], 6)
    cache.update(k, np.ones((1, 1, 2, 2)), positions=[[2, 6]])
    close(cache.memory()[0][0, 0, 0], [1, 0])  # un-rotated, both are (1, 0)
    close(cache.visible()[0][0, 0, 0], [math.cos(4), math.sin(4)])  # read at the mean position 4


@pytest.mark.parametrize("cls", [ReferenceCache, StreamCache])
def test_positions_are_checked_and_bad_ones_change_nothing(cls, rng):
    cache = cls(rules.Cumulative(), num_heads=1, head_dim=2, batch_size=2, rope=RoPE(10.0))
    cache.update(np.ones((2, 1, 2)), np.ones((2, 1, 2)), positions=[5, 0])
    with pytest.raises(ValueError, match="positions: row 0 goes backwards, from 5 to 4"):
        cache.update(np.ones((2, 1, 2)), np.ones((2, 1, 2)), positions=[4, 1])
    with pytest.raises(ValueError, match="positions: row 1 goes backwards, from 3 to 2"):
        cache.update(np.ones((2, 1, 2, 2)), np.ones((2, 1, 2, 2)), positions=[[6, 7], [3, 2]])
    with pytest.raises(ValueError, match=r"positions: expected shape \(2, 2\), got \(2,\)"):
        cache.update(np.ones((2, 1, 2, 2)), np.ones((2, 1, 2, 2)), positions=[6, 7])
    with pytest.raises(TypeError, match="positions: expected integers, got dtype float64"):
        cache.update(np.ones((2, 1, 2)), np.ones((2, 1, 2)), positions=[6.0, 7.0])
    with pytest.raises(ValueError, match="positions: expected integers >= 0, got -1"):
        cache.update(np.ones((2, 1, 2)), np.ones((2, 1, 2)), positions=[6, -1])
    with pytest.raises(ValueError, match="goes backwards"):
        cache.forward(np.ones((2, 1, 2, 2)), np.ones((2, 1, 2, 2)), np.ones((2, 1, 2, 2)), positions=[[5, 6], [1, 0]])
    np.testing.assert_array_equal(cache.length, [1, 1])
    cache.update(np.ones((2, 1, 2)), np.ones((2, 1, 2)), positions=[5, 0])  # equal positions are allowed
    with pytest.raises(ValueError, match="row 0 goes backwards, from 5 to 2"):
        cache.update(np.ones((2, 1, 2)), np.ones((2, 1, 2)))  # default: the tokens seen before, 2 here
    np.testing.assert_array_equal(cache.length, [2, 2])


# -- retention ----------------------------------------------------------------------------------


SUMMARY_RULES = SUMMARY
# (batch, KV heads, query heads, d_k, d_v, window, sinks)
SHAPES = [(1, 1, 1, 1, 1, 0, 0), (2, 3, 3, 7, 5, 0, 2), (1, 2, 6, 17, 3, 4, 0), (2, 2, 4, 8, 7, 5, 3)]


@pytest.mark.parametrize("rule", SUMMARY_RULES, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fifo_stream_cache_is_the_history_model(rule, shape, rng):
    B, H, Hq, dk, dv, window, sinks = shape
    make = dict(num_heads=H, head_dim=dk, value_dim=dv, num_query_heads=Hq, batch_size=B, window=window, sinks=sinks)
    rope = RoPE(30.0, dim=dk - dk % 2) if dk > 1 and not isinstance(rule, rules.Compressive) else None
    ref, stream = ReferenceCache(rule, rope=rope, **make), StreamCache(rule, rope=rope, **make)
    q, k, v = data(rng, B, H, Hq, 19, dk, dv)
    for lo, hi in [(0, 1), (1, 7)]:  # blocks, then steps
        ref.update(k[:, :, lo:hi], v[:, :, lo:hi])
        stream.update(k[:, :, lo:hi], v[:, :, lo:hi])
        close(stream.attend(q[:, :, hi - 1]), ref.attend(q[:, :, hi - 1]))
    close(stream.forward(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:]), ref.forward(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:]))
    for a, b in zip(stream.visible(), ref.visible()):
        close(a, b)
    for a, b in zip(stream.memory(), ref.memory()):
        close(a, b)


@pytest.mark.parametrize("retain", ["tova", "h2o"])
@pytest.mark.parametrize("rule", [rules.Drop(), rules.Merge(2)], ids=repr)
def test_a_window_longer_than_the_text_is_full_attention(retain, rule, rng):
    q, k, v = data(rng, 2, 2, 4, 12, 5, 3)
    make = dict(num_heads=2, head_dim=5, value_dim=3, num_query_heads=4, batch_size=2)
    full = ReferenceCache(None, window=12, **make)
    close(StreamCache(rule, window=12, retain=retain, **make).forward(q, k, v), full.forward(q, k, v))


def steps(cache, keys, queries):
    for key, query in zip(keys, queries):
        cache.step(
            np.array(query, float).reshape(1, 1, -1),
            np.array(key, float).reshape(1, 1, -1),
            np.array(key, float).reshape(1, 1, -1),
        )
    return cache


def test_tova_by_hand(rng):
    A, B, C = [1, 0], [-1, 0], [0, 0]
    # q = (20, 0): A weighs ~1, B ~e^-40; the third pair makes three candidates for two places:
    # TOVA folds B, the least weighed; fifo would fold A, the oldest
    tova = steps(
        StreamCache(rules.Cumulative(), num_heads=1, head_dim=2, window=2, retain="tova", scale=1.0),
        [A, B, C],
        [[20, 0]] * 3,
    )
    close(tova.visible()[0][0, 0], [B, A, C])  # [slot | window]: the slot holds B alone
    fifo = steps(
        StreamCache(rules.Cumulative(), num_heads=1, head_dim=2, window=2, scale=1.0), [A, B, C], [[20, 0]] * 3
    )
    close(fifo.visible()[0][0, 0], [A, B, C])


def test_tova_and_h2o_differ_by_hand():
    A, B, C, D = [1, 0], [0, 1], [0, 1], [0, 0]
    keys, queries = [A, B, C, D], [[0, 0], [20, 0], [0, 20], [0, 0]]
    # weights: step 1 A = 1; step 2 A ~1, B ~0; step 3 folds B, then A ~0, C ~1; step 4: TOVA folds A
    # (last weight ~0), H2O folds C (sum ~1 against A's ~2)
    tova = steps(StreamCache(None, num_heads=1, head_dim=2, window=2, retain="tova", scale=1.0), keys, queries)
    h2o = steps(StreamCache(None, num_heads=1, head_dim=2, window=2, retain="h2o", recent=0, scale=1.0), keys, queries)
    close(tova.visible()[0][0, 0], [C, D])
    close(h2o.visible()[0][0, 0], [A, D])
    # the recent newest candidates are never folded: recent=1 protects D alone (the same choice), recent=2
    # protects C and D, so A goes despite its sum
    for recent, kept in [(1, [A, D]), (2, [C, D])]:
        h2o = steps(
            StreamCache(None, num_heads=1, head_dim=2, window=2, retain="h2o", recent=recent, scale=1.0), keys, queries
        )
        close(h2o.visible()[0][0, 0], kept)


def test_h2o_with_every_pair_recent_and_retention_without_queries_are_fifo(rng):
    q, k, v = data(rng, 2, 2, 2, 15, 4, 4)
    make = dict(num_heads=2, head_dim=4, batch_size=2, window=5, sinks=1)
    fifo = StreamCache(rules.Merge(2), **make)
    close(StreamCache(rules.Merge(2), retain="h2o", recent=5, **make).forward(q, k, v), fifo.forward(q, k, v))
    for retain in ("tova", "h2o"):
        cache = StreamCache(rules.Merge(2), retain=retain, **make)
        cache.update(k, v)  # no query ever weighs a pair: every candidate is unscored
        for a, b in zip(cache.visible(), fifo.visible()):
            close(a, b)


@pytest.mark.parametrize("retain", ["tova", "h2o"])
def test_update_of_a_block_is_one_token_updates_and_keeps_the_unscored(retain, rng):
    q, k, v = data(rng, 1, 2, 4, 16, 4, 4)
    make = dict(num_heads=2, head_dim=4, num_query_heads=4, window=6, sinks=2, retain=retain)
    a, b = StreamCache(rules.Merge(3), **make), StreamCache(rules.Merge(3), **make)
    close(a.forward(q[:, :, :10], k[:, :, :10], v[:, :, :10]), b.forward(q[:, :, :10], k[:, :, :10], v[:, :, :10]))
    a.update(k[:, :, 10:], v[:, :, 10:])
    for t in range(10, 16):
        b.update(k[:, :, t], v[:, :, t])
    for x, y in zip(a.visible() + a.memory(), b.visible() + b.memory()):
        close(x, y)
    close(a.visible()[0][:, :, -6:], k[:, :, 10:])  # the six unscored pairs are the window


def test_tova_scores_are_the_group_mean_of_the_full_softmax(rng):
    """Weights include the sinks and the slots (with their bias) and are averaged over the query heads."""
    q, k, v = data(rng, 1, 1, 3, 9, 4, 2)
    cache = StreamCache(
        rules.Merge(2), num_heads=1, head_dim=4, value_dim=2, num_query_heads=3, window=4, sinks=2, retain="tova"
    )
    cache.forward(q, k, v)
    keys, _, _ = cache.visible()
    bias = cache.visible_bias()[0, 0]
    assert bias[2] > 0 or bias[3] > 0  # a merged slot
    w = reference.softmax_weights(q[0, :, -1], keys[0, 0], cache.scale, bias)
    close(cache.lanes[0][0].score, w[:, -4:].mean(axis=0))


def test_retention_parameters_are_checked():
    with pytest.raises(ValueError, match="retain: expected one of 'fifo', 'tova', 'h2o', got 'lru'"):
        StreamCache(None, num_heads=1, head_dim=2, window=4, retain="lru")
    with pytest.raises(ValueError, match=r"recent: expected an integer in \[0, window=4\], got 5"):
        StreamCache(None, num_heads=1, head_dim=2, window=4, retain="h2o", recent=5)
    with pytest.raises(ValueError, match="recent: only retain='h2o'"):
        StreamCache(None, num_heads=1, head_dim=2, window=4, retain="tova", recent=1)
    assert StreamCache(None, num_heads=1, head_dim=2, window=5, retain="h2o").recent == 2


def test_merge_parameters_are_checked():
    with pytest.raises(ValueError, match="slots must be an integer in"):
        rules.Merge(0)
    with pytest.raises(ValueError, match="Merge: bias must be 'log_count' or None, got 'log'"):
        rules.Merge(4, bias="log")
    with pytest.raises(TypeError, match="Merge: slots: expected an integer"):
        rules.Merge(2.5)
    for rule in (rules.Merge(4), rules.Merge(1, bias=None)):
        assert rules.from_spec(rule._spec()) == rule
    assert kvfold.MemoryCache(rules.Merge(5), num_heads=1, head_dim=2).memory_slots == 5
