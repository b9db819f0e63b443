"""Examples of every rule, for the tests that run over all of them. A new rule adds its examples here:
test_reference compares them with the rule's reference fold, and the half-precision, state, fuzz,
thread, limit and RoPE tests take them up (test_every_kind_has_examples fails until they are here)."""

import numpy as np

from kvfold import rules

# The summary rules (slot memories), each with its options.
SUMMARY = [
    rules.Drop(),
    rules.Cumulative(),
    rules.Moving(3),
    rules.Weighted((0.5, 0.0, 2.0)),
    rules.EMA(0.3),
    rules.Compressive(2, 3),
    rules.Compressive(3, 2, "max"),
    rules.Merge(3),
    rules.Merge(2, bias=None),
]

# The matrix rules, with fixed gates (per head: two heads) and per-token ones.
MATRIX = [
    rules.Linear(),
    rules.Linear("elu1", normalize=True, mix=0.7),
    rules.Gated(decay=[-0.1, -0.3]),
    rules.Gated(mix=0.5),  # per-token decay
    rules.Delta(beta=0.5),
    rules.GatedDelta(),  # per-token decay and beta
]

# The summary rules whose slots average folded pairs, as the rules declare it: those a RoPE rotates.
ROPE = [r for r in SUMMARY if r.averages_pairs]


def gru(head_dim, value_dim, heads=2, seed=11):
    """A GRU with small random weights per head (D = head_dim + value_dim)."""
    w, D = np.random.default_rng(seed), head_dim + value_dim
    return rules.GRU(
        weight_ih=0.3 * w.standard_normal((heads, 3 * D, D)),
        weight_hh=0.3 * w.standard_normal((heads, 3 * D, D)),
        bias_ih=0.1 * w.standard_normal((heads, 3 * D)),
    )


def every_rule(head_dim, value_dim):
    """One or more of every rule but Custom (whose fold is a Python function), for two heads."""
    return SUMMARY + [gru(head_dim, value_dim)] + MATRIX
