"""Every rule, through every path of the C++ cache, against kvfold.reference."""

import numpy as np
import pytest

from conftest import SHAPES, blocks_then_forward, close, make_cache, shape_tokens, steps_match_reference
from kvfold import reference, rules
from rule_cases import SUMMARY, every_rule

# every summary rule (rule_cases.SUMMARY; the matrix rules: test_matrix.py) and edge cases: one
# slot, a weight of 0, alpha 1, merges of few and many slots
RULES = SUMMARY + [
    rules.Moving(1),
    rules.Weighted((0.5, 0.0, 2.0, 1.0)),
    rules.EMA(1.0),
    rules.Compressive(1, 1),
    rules.Merge(1),
    rules.Merge(7, bias=None),
    rules.Merge(17),
]

T = 30


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_step_matches_reference(rule, shape, rng):
    steps_match_reference(rule, shape, rng, T)


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("shape", SHAPES[1:5], ids=str)
def test_blocks_reset_and_forward_match_reference(rule, shape, rng):
    # an uneven split into blocks, a row reset, then forward over the rest
    cache, ref = blocks_then_forward(rule, shape, rng, T, [(0, 1), (1, 9), (9, 20)], reset_rows=[0])
    for a, b in zip(cache.memory(), ref.memory()):
        close(a, b)


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


@pytest.mark.one_backend
def test_every_kind_has_examples():
    """A new rule adds its examples to tests/rule_cases.py, which the tests over every rule read."""
    missing = set(rules.kinds()) - {r.kind for r in every_rule(2, 2)} - {rules.Custom.kind}
    assert not missing, f"add examples of {sorted(missing)} to tests/rule_cases.py"
