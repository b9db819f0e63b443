"""Checkpoints and rollback, and the batch operations (reorder, select, concat)."""

import copy
import pickle

import numpy as np
import pytest

import kvfold
from kvfold import rules
from state_cases import (
    RULES,
    feed,
    make,
    part,
    queries,
    state,
    tokens,
)

# ---------------------------------------------------------------------------------------------
# Checkpoints and rollback


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_rollback_restores_bit_exactly(rule, rng):
    c = make(rule, batch_size=3, dtype="bfloat16")
    feed(c, rng)
    cp = c.checkpoint()
    before = state(c)
    assert cp.nbytes == c.nbytes and cp.batch_size == 3 and cp.length.tolist() == [11] * 3
    feed(c, rng, T=7)
    assert state(c) != before
    c.rollback(cp)
    assert state(c) == before
    feed(c, rng, T=2)
    c.rollback(cp)  # a checkpoint can be restored many times
    assert state(c) == before


def test_rollback_of_some_rows(rng):
    c = make(rules.Moving(2), batch_size=3)
    feed(c, rng)
    cp = c.checkpoint()
    at_cp = c.copy()
    feed(c, rng, T=5)
    after = c.copy()
    c.rollback(cp, rows=[2, 0])
    for row, source in [(0, at_cp), (1, after), (2, at_cp)]:
        assert c.select([row]).to_bytes() == source.select([row]).to_bytes()
    assert c.length.tolist() == [11, 16, 11]
    c.rollback(cp, rows=[])
    assert c.length.tolist() == [11, 16, 11]


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("window, sinks", [(0, 0), (3, 2), (6, 0)])
def test_speculative_decoding_equals_a_cache_that_saw_only_accepted_tokens(rule, window, sinks, rng):
    """Checkpoint, verify k draft tokens, roll back, re-feed the accepted prefix."""
    spec = make(rule, window=window, sinks=sinks)
    truth = make(rule, window=window, sinks=sinks)
    k, v, gates = feed(spec, rng, T=5)
    truth.update(k, v, **gates)
    for _ in range(25):
        draft = int(rng.integers(1, 6))
        q = queries(spec, rng, draft)
        k, v, gates = tokens(rule, rng, 2, 2, draft)
        cp = spec.checkpoint()
        verified = spec.forward(q, k, v, **gates)  # scores every draft token
        n = int(rng.integers(0, draft + 1))  # accepted
        spec.rollback(cp)
        if n:
            accepted = part(gates, np.s_[:, :, :n])
            spec.update(k[:, :, :n], v[:, :, :n], **accepted)
            expected = truth.forward(q[:, :, :n], k[:, :, :n], v[:, :, :n], **accepted)
            if spec.matrix_memory:  # blocks of different lengths run in different chunks
                np.testing.assert_allclose(verified[:, :, :n], expected, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(verified[:, :, :n], expected)
        assert state(spec) == state(truth)
    q = queries(spec, rng)
    np.testing.assert_array_equal(spec.attend(q), truth.attend(q))


def test_checkpoint_from_another_cache_of_the_same_configuration(rng):
    a, b = make(), make()
    feed(a, rng)
    b.rollback(a.checkpoint())
    assert b.to_bytes() == a.to_bytes()


@pytest.mark.parametrize(
    "other, words",
    [
        (dict(window=5), ["window=4", "window=5"]),
        (dict(sinks=0), ["sinks=1", "sinks=0"]),
        (dict(batch_size=3), ["batch_size=2", "batch_size=3"]),
        (dict(num_heads=1, num_query_heads=2), ["num_heads=2", "num_heads=1"]),
        (dict(head_dim=6), ["head_dim=5", "head_dim=6"]),
        (dict(value_dim=5), ["value_dim=3", "value_dim=5"]),
        (dict(num_query_heads=2), ["num_query_heads=4", "num_query_heads=2"]),
        (dict(dtype="float16"), ["dtype=float32", "dtype=float16"]),
        (dict(scale=0.25), ["scale=0.44721", "scale=0.25"]),
        (dict(check_finite=False), ["check_finite=True", "check_finite=False"]),
        (dict(rule=rules.EMA(0.25)), ["rule=EMA(alpha=0.3)", "rule=EMA(alpha=0.25)"]),
        (dict(rule=rules.Cumulative()), ["rule=EMA(alpha=0.3)", "rule=Cumulative()"]),
    ],
)
def test_a_checkpoint_from_another_configuration_is_refused(other, words, rng):
    source = make()
    feed(source, rng)
    cp = source.checkpoint()
    target = make(**other)
    feed(target, rng)
    before = target.to_bytes()
    with pytest.raises(ValueError) as info:
        target.rollback(cp)
    assert str(info.value).startswith("checkpoint: taken from a cache with ")
    for w in words:
        assert w in str(info.value)
    assert target.to_bytes() == before


def test_rollback_errors_leave_the_cache_unchanged(rng):
    c = make()
    feed(c, rng)
    cp = c.checkpoint()
    feed(c, rng)
    before = c.to_bytes()
    for call, error, words in [
        (lambda: c.rollback(cp, rows=[0, 2]), ValueError, "rows: expected row indices in [0, 2), got 2 at position 1"),
        (lambda: c.rollback(cp, rows=[-1]), ValueError, "got -1"),
        (lambda: c.rollback(cp, rows=[[0]]), ValueError, "rows: expected a 1-D sequence"),
        (lambda: c.rollback(cp, rows=["a"]), TypeError, "rows: expected a sequence of integer row indices"),
        (lambda: c.rollback(c.to_bytes()), TypeError, "checkpoint: expected a kvfold.Checkpoint"),
        (lambda: c.rollback(None), TypeError, "got NoneType"),
    ]:
        with pytest.raises(error) as info:
            call()
        assert words in str(info.value)
        assert c.to_bytes() == before


def test_checkpoint_is_immutable_and_readable(rng):
    c = make(rules.Moving(3), batch_size=3)
    feed(c, rng)
    cp = c.checkpoint()
    assert repr(cp) == f"Checkpoint(rule=Moving(n=3), batch_size=3, length=[11, 11, 11], nbytes={c.nbytes})"
    with pytest.raises(AttributeError, match="immutable"):
        cp.nbytes = 0
    with pytest.raises(AttributeError, match="immutable"):
        cp._state = None
    with pytest.raises(TypeError, match="made by MemoryCache.checkpoint"):
        kvfold.Checkpoint()
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(cp)
    assert copy.copy(cp) is cp and copy.deepcopy(cp) is cp
    length = cp.length
    length[0] = 99  # a copy
    assert cp.length.tolist() == [11, 11, 11]
    before = c.to_bytes()
    feed(c, rng)
    c.reset()
    c.rollback(cp)
    assert c.to_bytes() == before


# ---------------------------------------------------------------------------------------------
# Batch operations, against caches that were fed the rows in that order from the start


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_reorder_select_concat_equal_caches_fed_in_that_order(rule, rng):
    k, v, gates = tokens(rule, rng, 3, 2, 13)
    kw = dict(dtype="float16", window=3, sinks=2)

    def rows_fed(order):
        c = make(rule, batch_size=len(order), **kw)
        c.update(k[order], v[order], **part(gates, order))
        return state(c)

    c = make(rule, batch_size=3, **kw)
    c.update(k, v, **gates)
    for order in ([2, 0, 1], [1, 1, 1, 0, 2, 2], [2], [0, 1, 2]):
        assert state(c.select(order)) == rows_fed(order)
    joined = kvfold.MemoryCache.concat([c.select([2]), c, c.select([1, 0])])
    assert state(joined) == rows_fed([2, 0, 1, 2, 1, 0])
    assert joined.rule == rule and joined.batch_size == 6
    c.reorder([2, 2, 0, 1])  # in place; the batch grows
    assert c.batch_size == 4 and state(c) == rows_fed([2, 2, 0, 1])
    c.reorder([3])  # and shrinks
    assert state(c) == rows_fed([1])
    assert c.nbytes == make(rule, batch_size=1, **kw).nbytes


def test_beam_search_reorder_then_continue(rng):
    """Beams that are reordered and then fed equal beams that were fed that history from the start."""
    rule = rules.Compressive(2, 2)
    beams = make(rule, batch_size=1)
    k0, v0, _ = feed(beams, rng, T=3)
    beams.reorder([0, 0, 0, 0])
    history = [[(k0[0], v0[0])] for _ in range(4)]
    for _ in range(6):
        k = rng.standard_normal((4, 2, 1, 5), dtype=np.float32)
        v = rng.standard_normal((4, 2, 1, 3), dtype=np.float32)
        beams.update(k, v)
        history = [h + [(k[b], v[b])] for b, h in enumerate(history)]
        keep = rng.integers(0, 4, size=4)
        beams.reorder(keep)
        history = [list(history[i]) for i in keep]
    for b in range(4):
        alone = make(rule, batch_size=1)
        for k, v in history[b]:
            alone.update(k[None], v[None])
        assert beams.select([b]).to_bytes() == alone.to_bytes()


def test_batch_operation_errors_leave_the_cache_unchanged(rng):
    c = make()
    feed(c, rng)
    before = c.to_bytes()
    cases = [
        (lambda: c.reorder([]), ValueError, "indices: expected at least one row index, got none"),
        (lambda: c.reorder([0, 5]), ValueError, "indices: expected row indices in [0, 2), got 5 at position 1"),
        (lambda: c.reorder([[0, 1]]), ValueError, "indices: expected a 1-D sequence"),
        (lambda: c.reorder([0.5]), TypeError, "indices: expected a sequence of integer row indices"),
        (lambda: c.reorder(None), TypeError, "indices:"),
        (lambda: c.reorder(np.zeros(1 << 25, np.int64)), ValueError, "batch_size"),
        (lambda: c.select([]), ValueError, "rows: expected at least one row index"),
        (lambda: c.select([-1]), ValueError, "rows: expected row indices in [0, 2), got -1"),
        (lambda: c.select("0"), TypeError, "rows:"),
        (lambda: kvfold.MemoryCache.concat([]), ValueError, "caches: expected at least one cache, got none"),
        (lambda: kvfold.MemoryCache.concat(c), TypeError, "caches: expected a sequence of kvfold.MemoryCache"),
        (lambda: kvfold.MemoryCache.concat([c, 3]), TypeError, "caches[1]: expected a kvfold.MemoryCache, got int"),
        (
            lambda: kvfold.MemoryCache.concat([c, make(window=2)]),
            ValueError,
            "caches[1]: expected window=4 like caches[0], got window=2",
        ),
        (lambda: kvfold.MemoryCache.concat([c, make(dtype="bfloat16")]), ValueError, "dtype=float32"),
        (
            lambda: kvfold.MemoryCache.concat([c, c, make(rules.Moving(3))]),
            ValueError,
            "caches[2]: expected rule=EMA(alpha=0.3) like caches[0], got rule=Moving(n=3)",
        ),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as info:
            call()
        assert words in str(info.value), str(info.value)
        assert c.to_bytes() == before


def test_concat_of_one_cache_with_itself(rng):
    c = make()
    feed(c, rng)
    assert kvfold.MemoryCache.concat([c, c]).to_bytes() == c.select([0, 1, 0, 1]).to_bytes()
    assert kvfold.MemoryCache.concat(x for x in [c]).to_bytes() == c.to_bytes()


# ---------------------------------------------------------------------------------------------
# A decode step whose one visible row is a summary slot (window 0, no sinks) writes its output
# straight from the rule's sums and the slot rows only when something else reads them.

LAGGING = {
    "to_bytes": lambda c, q, k, v: c.to_bytes(),
    "counts": lambda c, q, k, v: (c.length.tobytes(), c.last_position.tobytes(), c.nbytes, c.visible_size),
    "memory": lambda c, q, k, v: [m.tobytes() for m in c.memory()],
    "visible": lambda c, q, k, v: [m.tobytes() for m in c.visible()],
    "attend": lambda c, q, k, v: c.attend(q).tobytes(),
    "update": lambda c, q, k, v: (c.update(k, v), c.to_bytes()),
    "forward": lambda c, q, k, v: (c.forward(q[:, :, None], k, v).tobytes(), c.to_bytes()),
    "copy": lambda c, q, k, v: (copy.deepcopy(c).to_bytes(), pickle.loads(pickle.dumps(c)).to_bytes()),
    "checkpoint": lambda c, q, k, v: (lambda cp: (c.reset(), c.rollback(cp), c.to_bytes()))(c.checkpoint()),
    "rollback rows": lambda c, q, k, v: (lambda cp: (c.reset(), c.rollback(cp, rows=[1]), c.to_bytes()))(
        c.checkpoint()
    ),
    "select": lambda c, q, k, v: c.select([1, 0, 1]).to_bytes(),
    "concat": lambda c, q, k, v: kvfold.MemoryCache.concat([c, c]).to_bytes(),
    "reorder": lambda c, q, k, v: (c.reorder([1, 0]), c.to_bytes()),
    "reset rows": lambda c, q, k, v: (c.reset([0]), c.to_bytes()),
}


@pytest.mark.parametrize("read", LAGGING.values(), ids=list(LAGGING))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rule", [rules.Cumulative(), rules.EMA(0.3)], ids=repr)
def test_every_call_after_decode_steps_of_one_slot_sees_the_slots_they_folded(rule, dtype, read, rng):
    fast, twin = make(rule, window=0, sinks=0, dtype=dtype), make(rule, window=0, sinks=0, dtype=dtype)
    for _ in range(3):  # the slots of `fast` lag three folds (float32) when `read` comes
        k, v, _ = tokens(rule, rng, 2, 2, 1)
        q = queries(fast, rng)
        out = fast.step(q, k[:, :, 0], v[:, :, 0])
        twin.update(k, v)
        assert np.array_equal(out, twin.attend(q))  # both the slot's value, in every query head
    k, v, _ = tokens(rule, rng, 2, 2, 3)
    q = queries(fast, rng)
    assert read(fast, q, k[:, :, :1], v[:, :, :1]) == read(twin, q, k[:, :, :1], v[:, :, :1])
    assert fast.to_bytes() == twin.to_bytes()
