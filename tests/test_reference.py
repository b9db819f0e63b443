"""Every rule, through every path of the C++ cache, against kvfold.reference."""

import numpy as np
import pytest

from conftest import SHAPES, blocks_then_forward, close, make_cache, shape_tokens, steps_match_reference
from kvfold import reference, rules

RULES = [
    rules.Drop(),
    rules.Cumulative(),
    rules.Moving(3),
    rules.Moving(1),
    rules.Weighted((0.5, 0.0, 2.0, 1.0)),
    rules.EMA(0.3),
    rules.EMA(1.0),
    rules.Compressive(3, 2),
    rules.Compressive(2, 3, pool="max"),
    rules.Compressive(1, 1),
]

T = 23


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_step_matches_reference(rule, shape, rng):
    steps_match_reference(rule, shape, rng, T)


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("shape", SHAPES[1:5], ids=str)
def test_blocks_and_forward_match_reference(rule, shape, rng):
    # an uneven split into blocks, then forward over the rest
    cache, ref = blocks_then_forward(rule, shape, rng, T, [(0, 1), (1, 6), (6, 13)])
    close(cache.memory()[1], ref.memory()[1])


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_rows_diverge_after_reset(rule, rng):
    shape = (3, 2, 4, 5, 6, 3, 1)
    cache, ref = make_cache(rule, shape), make_cache(rule, shape, reference.ReferenceCache)
    q, k, v = shape_tokens(rng, shape, 20)
    cache.update(k[:, :, :9], v[:, :, :9])
    ref.update(k[:, :, :9], v[:, :, :9])
    cache.reset(rows=[1])
    ref.reset(rows=[1])
    close(cache.forward(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:]), ref.forward(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:]))
    np.testing.assert_array_equal(cache.length, [20, 11, 20])
    ck, cv, cm = cache.visible()
    rk, rv, rm = ref.visible()
    close(ck, rk)
    np.testing.assert_array_equal(cm, rm)


@pytest.mark.parametrize("rule", [rules.Drop(), rules.Cumulative(), rules.Compressive(3, 5)], ids=repr)
@pytest.mark.parametrize("dims", [(33, 17), (128, 130)], ids=str)
def test_long_windows_and_large_groups_match_reference(rule, dims, rng):
    """Visible sets longer than one block of rows, query groups wider than one pass takes, and rows
    of different lengths side by side."""
    dk, dv = dims
    shape = (2, 2, 20, dk, dv, 70, 3)  # 10 query heads per KV head; up to 3 + 3 + 70 visible rows
    cache, ref = make_cache(rule, shape), make_cache(rule, shape, reference.ReferenceCache)
    q, k, v = shape_tokens(rng, shape, 150)
    close(
        cache.forward(q[:, :, :90], k[:, :, :90], v[:, :, :90]), ref.forward(q[:, :, :90], k[:, :, :90], v[:, :, :90])
    )
    cache.reset(rows=[0])
    ref.reset(rows=[0])
    for t in range(90, 150):
        close(cache.step(q[:, :, t], k[:, :, t], v[:, :, t]), ref.step(q[:, :, t], k[:, :, t], v[:, :, t]))
