"""The memory in the reference model: the slots a rule keeps after folding pairs (each rule's own fold is
``reference_fold`` beside its definition in ``kvfold.rules``), with the positions a RoPE rotates them at,
and the matrix rules' state."""

from __future__ import annotations

import math
from typing import Any, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from .. import rules
from ..rope import RoPE
from ..rules._base import Pair
from ..rules.summary import MergeSlots

MATRIX_RULES = tuple(cls for cls in rules.kinds().values() if cls.matrix)


def fold_memory(rule: rules.Rule, folded: List[Pair]) -> List[Pair]:
    """The memory slots, oldest first, after folding ``folded`` pairs in order."""
    return rule.reference_fold(folded) if folded else []


def gru_cell(rule: rules.GRU, head: int, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """torch.nn.GRUCell for KV head ``head``: gate order r, z, n."""
    return rule.reference_cell(head, x, h)


def matrix_fold(
    rule: rules.Rule,
    S: np.ndarray,
    z: Optional[np.ndarray],
    k: np.ndarray,
    v: np.ndarray,
    decay: Optional[np.ndarray],
    beta: Optional[np.ndarray],
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """One token into S (H, d_k, d_v) (and z (H, d_k)): k (H, d_k), v (H, d_v); decay the log-space
    gate, (H,) or (H, d_k), beta (H,), each the token's own or the rule's constant."""
    return _matrix_rule(rule).reference_step(S, z, (k, v, decay, beta))


def matrix_read(rule: rules.Rule, S: np.ndarray, z: Optional[np.ndarray], q: np.ndarray, scale: float) -> np.ndarray:
    """o = scale q^T S, or phi(q)^T S / (phi(q)^T z + eps) for normalized Linear: q (d_k,), S (d_k, d_v)."""
    return _matrix_rule(rule).reference_read(S, z, q, scale)


def _matrix_rule(rule: rules.Rule) -> rules.MatrixRule:
    if not isinstance(rule, rules.MatrixRule):
        raise TypeError(f"reference: {type(rule).__name__} is not a matrix rule")
    return rule


def check_rope(rule: rules.Rule, rope: Optional[RoPE], head_dim: int) -> None:
    """TypeError/ValueError unless ``rope`` is None or a RoPE that fits ``head_dim`` and ``rule``."""
    if rope is None:
        return
    if not isinstance(rope, RoPE):
        raise TypeError(f"rope: expected a kvfold.RoPE or None, got {type(rope).__name__}")
    rope.rotated_dims(head_dim)
    if not rule.averages_pairs:
        raise ValueError(
            f"rope: the slots of {rule!r} are not averages of folded pairs, so they have no position to rotate "
            "at; rope works with the rules whose slots are (rule.averages_pairs)"
        )


class Slot(NamedTuple):
    key: np.ndarray  # as folded: un-rotated when the cache has a RoPE
    value: np.ndarray
    # the average of the folded positions (nan for GRU and Custom); per head, an (H,) array
    position: Union[float, np.ndarray]
    # added to the slot's attention logit: ln n for Merge with bias="log_count", else 0; per head, (H,)
    bias: Union[float, np.ndarray]


def memory_slots(rule: rules.Rule, folded: List[Tuple[np.ndarray, np.ndarray, Any]], head: int = 0) -> List[Slot]:
    """The memory after folding ``(k, v, position)`` triples in order: for the averaging rules the
    position is averaged as a value is (an extra value column); Merge keeps its position sum. Pairs
    are (H, d) for a batch row or (d,) for one lane, KV head ``head`` (whose weights a GRU uses)."""
    if isinstance(rule, rules.Merge):  # per head: each lane merges its own slots
        if not folded:
            return []
        heads = [MergeSlots(rule) for _ in range(len(folded[0][0]) if folded[0][0].ndim == 2 else 1)]
        for k, v, p in folded:
            for h, merge in enumerate(heads):
                merge.fold(k[h] if k.ndim == 2 else k, v[h] if v.ndim == 2 else v, p)
        if folded[0][0].ndim == 1:
            return merge_slots(rule, heads[0])
        per_head = [merge_slots(rule, m) for m in heads]
        return [
            Slot(*(np.stack([np.asarray(head[s][f]) for head in per_head]) for f in range(4)))
            for s in range(len(per_head[0]))
        ]
    if isinstance(rule, rules.GRU) and folded and folded[0][0].ndim == 1:  # one lane: its head's cell
        dk = len(folded[0][0])
        state = np.zeros(dk + len(folded[0][1]))
        for k, v, _ in folded:
            state = gru_cell(rule, head, np.concatenate([k, v]), state)
        return [Slot(state[:dk], state[dk:], math.nan, 0.0)]
    if not rule.averages_pairs:
        return [Slot(k, v, math.nan, 0.0) for k, v in fold_memory(rule, [(k, v) for k, v, _ in folded])]
    with_position = [
        (k, np.concatenate([v, np.broadcast_to(np.asarray(p, np.float64), v.shape[:-1])[..., None]], -1))
        for k, v, p in folded
    ]
    return [Slot(k, v[..., :-1], v[..., -1], 0.0) for k, v in fold_memory(rule, with_position)]


def merge_slots(rule: rules.Merge, merge: MergeSlots) -> List[Slot]:
    log_count = rule.bias == "log_count"
    return [Slot(k, v, p, math.log(n) if log_count else 0.0) for k, v, p, n in merge.read()]


def max_slots(rule: rules.Rule) -> int:
    return rule.max_slots
