"""A plain NumPy model of kvfold, written from the formulas: slow, float64, obviously right.

It keeps every pair it was given and derives sinks, window and memory from that history at each
call, so it shares no state logic with the C++ core. Tests compare every C++ path against it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from . import rules

Pair = Tuple[np.ndarray, np.ndarray]  # keys (H, d_k), values (H, d_v) of one token


def fold_memory(rule: rules.Rule, folded: List[Pair]) -> List[Pair]:
    """The memory slots, oldest first, after folding ``folded`` pairs in order."""
    if not folded or isinstance(rule, rules.Drop):
        return []
    if isinstance(rule, rules.Cumulative):
        mem = None
        for i, kv in enumerate(folded):  # Mem_i = (kv_i + i * Mem_{i-1}) / (i + 1)
            mem = kv if mem is None else tuple((x + i * m) / (i + 1) for x, m in zip(kv, mem))
        return [mem]
    if isinstance(rule, rules.Moving):
        last = folded[-rule.n :]
        return [tuple(np.mean([kv[j] for kv in last], axis=0) for j in (0, 1))]
    if isinstance(rule, rules.Weighted):
        last = folded[-len(rule.betas) :]
        w = np.asarray(rule.betas[len(rule.betas) - len(last) :], dtype=np.float64)
        return [tuple(sum(wi * kv[j] for wi, kv in zip(w, last)) / w.sum() for j in (0, 1))]
    if isinstance(rule, rules.EMA):
        mem = folded[0]
        for kv in folded[1:]:
            mem = tuple((1 - rule.alpha) * m + rule.alpha * x for x, m in zip(kv, mem))
        return [mem]
    if isinstance(rule, rules.Compressive):
        pool = np.mean if rule.pool == "mean" else np.max
        groups = [folded[i : i + rule.rate] for i in range(0, len(folded), rule.rate)]
        return [tuple(pool([kv[j] for kv in g], axis=0) for j in (0, 1)) for g in groups[-rule.slots :]]
    raise TypeError(f"reference: no model of {type(rule).__name__}")


def softmax_attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """q (d_k,), keys (n, d_k), values (n, d_v) -> (d_v,); zeros when n == 0."""
    if len(keys) == 0:
        return np.zeros(values.shape[-1])
    s = scale * (keys @ q)
    w = np.exp(s - s.max())
    return (w / w.sum()) @ values


class ReferenceCache:
    """The same model and API as ``kvfold.MemoryCache`` (update, attend, step, forward, memory,
    visible, reset, length), in float64."""

    def __init__(
        self,
        rule: Optional[rules.Rule],
        num_heads: int,
        head_dim: int,
        value_dim: Optional[int] = None,
        num_query_heads: Optional[int] = None,
        batch_size: int = 1,
        window: int = 0,
        sinks: int = 0,
        scale: Optional[float] = None,
    ) -> None:
        self.rule = rules.Drop() if rule is None else rule
        self.num_heads, self.head_dim = num_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.num_query_heads = num_heads if num_query_heads is None else num_query_heads
        self.batch_size, self.window, self.sinks = batch_size, window, sinks
        self.scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
        self.history: List[List[Pair]] = [[] for _ in range(batch_size)]

    @property
    def length(self) -> np.ndarray:
        return np.array([len(h) for h in self.history], dtype=np.int64)

    def _split(self, b: int) -> Tuple[List[Pair], List[Pair], List[Pair]]:
        """Row b's history as (sinks, folded, window)."""
        h = self.history[b]
        sinks, rest = h[: self.sinks], h[self.sinks :]
        cut = max(len(rest) - self.window, 0)
        return sinks, rest[:cut], rest[cut:]

    def update(self, k: np.ndarray, v: np.ndarray) -> None:
        k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
        if k.ndim == 3:
            k, v = k[:, :, None], v[:, :, None]
        for b in range(self.batch_size):
            for t in range(k.shape[2]):
                self.history[b].append((k[b, :, t].copy(), v[b, :, t].copy()))

    def memory(self) -> Tuple[np.ndarray, np.ndarray]:
        slots = {rules.Drop: 0, rules.Compressive: getattr(self.rule, "slots", 0)}.get(type(self.rule), 1)
        keys = np.zeros((self.batch_size, self.num_heads, slots, self.head_dim))
        values = np.zeros((self.batch_size, self.num_heads, slots, self.value_dim))
        for b in range(self.batch_size):
            for s, (mk, mv) in enumerate(fold_memory(self.rule, self._split(b)[1])):
                keys[b, :, s], values[b, :, s] = mk, mv
        return keys, values

    def visible_row(self, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """Row b's visible set [sinks | slots | window], oldest first: (H, n, d_k), (H, n, d_v)."""
        sinks, folded, window = self._split(b)
        pairs = sinks + fold_memory(self.rule, folded) + window
        if not pairs:
            return np.zeros((self.num_heads, 0, self.head_dim)), np.zeros((self.num_heads, 0, self.value_dim))
        return np.stack([p[0] for p in pairs], axis=1), np.stack([p[1] for p in pairs], axis=1)

    def visible(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = [self.visible_row(b) for b in range(self.batch_size)]
        n = max(r[0].shape[1] for r in rows)
        keys = np.zeros((self.batch_size, self.num_heads, n, self.head_dim))
        values = np.zeros((self.batch_size, self.num_heads, n, self.value_dim))
        mask = np.zeros((self.batch_size, n), dtype=bool)
        for b, (rk, rv) in enumerate(rows):
            m = rk.shape[1]
            keys[b, :, :m], values[b, :, :m], mask[b, :m] = rk, rv, True
        return keys, values, mask

    def attend(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, np.float64)
        group = self.num_query_heads // self.num_heads
        out = np.zeros((self.batch_size, self.num_query_heads, self.value_dim))
        for b in range(self.batch_size):
            keys, values = self.visible_row(b)
            for hq in range(self.num_query_heads):
                out[b, hq] = softmax_attend(q[b, hq], keys[hq // group], values[hq // group], self.scale)
        return out

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        self.update(k, v)
        return self.attend(q)

    def forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        steps = [self.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(q.shape[2])]
        return np.stack(steps, axis=2)

    def reset(self, rows: Optional[List[int]] = None) -> None:
        for b in range(self.batch_size) if rows is None else rows:
            self.history[b] = []
