"""``StreamCache``: the reference model kept incrementally per batch row and KV head, for what depends on
the queries as well (attention-chosen retention) and for long streams."""

from __future__ import annotations

import copy
from typing import Any, List, Optional, Tuple

import numpy as np

from .. import rules
from .._arguments import WithRetention, parameters_of
from ..rules.summary import MergeSlots
from .attention import RETAIN, Layout, check_positions, rotate, softmax_weights
from .memory import Slot, max_slots, memory_slots, merge_slots


class _Lane:
    """One batch row's KV head in a StreamCache: sinks, the window (oldest first, with positions and
    the recorded weights, NaN while unscored) and the memory."""

    def __init__(self, rule: rules.Rule, head: int, dk: int, dv: int) -> None:
        self.head = head  # the KV head (a GRU may have weights per head)
        self.sink_k, self.sink_v = np.zeros((0, dk)), np.zeros((0, dv))
        self.k, self.v = np.zeros((0, dk)), np.zeros((0, dv))
        self.position = np.zeros(0, dtype=np.int64)
        self.score = np.zeros(0)
        self.merge = MergeSlots(rule) if isinstance(rule, rules.Merge) else None
        self.folded: List[Tuple[np.ndarray, np.ndarray, int]] = []  # the other rules fold from the list
        self.slots: Optional[List[Slot]] = []  # memo of the memory; None after a fold


class StreamCache(Layout):
    """The model above, kept incrementally per batch row and KV head, in float64: every retention
    (``retain="fifo"``, ``"tova"``, ``"h2o"`` with ``recent``), ``rope`` and positions, every summary rule
    (matrix rules: ``ReferenceCache``). The API of ``kvfold.MemoryCache``: update, attend, step, forward,
    memory, visible, visible_size, reset, length; and ``visible_bias()``, the logit bias of each visible pair.
    """

    @parameters_of(WithRetention)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        a = WithRetention(*args, **kwargs)
        if a.rule is not None and a.rule.matrix:
            raise ValueError(f"rule: StreamCache models summary rules; {a.rule!r} is a matrix rule (ReferenceCache)")
        if a.num_query_heads is not None and a.num_query_heads % a.num_heads:
            raise ValueError(
                f"num_query_heads: expected a multiple of num_heads={a.num_heads}, got {a.num_query_heads}"
            )
        self._configure(a)
        if a.retain not in RETAIN:
            raise ValueError(f"retain: expected one of {', '.join(map(repr, RETAIN))}, got {a.retain!r}")
        self.retain = a.retain
        if a.recent is not None and a.retain != "h2o":
            raise ValueError(
                f"recent: only retain='h2o' keeps a recent part, got recent={a.recent} with retain={a.retain!r}"
            )
        self.recent = (a.window // 2 if a.recent is None else a.recent) if a.retain == "h2o" else 0
        if not 0 <= self.recent <= a.window:
            raise ValueError(f"recent: expected an integer in [0, window={a.window}], got {a.recent}")

    @property
    def length(self) -> np.ndarray:
        return np.array(self._length, dtype=np.int64)

    def reset(self, rows: Optional[List[int]] = None) -> None:
        if rows is None:
            self._length = [0] * self.batch_size
            self._last: List[Optional[int]] = [None] * self.batch_size
            self.lanes = [
                [_Lane(self.rule, h, self.head_dim, self.value_dim) for h in range(self.num_heads)]
                for _ in range(self.batch_size)
            ]
            return
        for b in rows:
            self._length[b], self._last[b] = 0, None
            self.lanes[b] = [_Lane(self.rule, h, self.head_dim, self.value_dim) for h in range(self.num_heads)]

    def copy(self) -> "StreamCache":
        return copy.deepcopy(self)

    def reorder(self, indices: Any) -> None:
        """New row r is old row indices[r] (rows may repeat; the batch size becomes len(indices))."""
        order = [int(i) for i in np.asarray(indices).reshape(-1)]
        if not order or not all(0 <= i < self.batch_size for i in order):
            raise ValueError(f"indices: expected row indices in [0, {self.batch_size}), got {order}")
        self.lanes = [copy.deepcopy(self.lanes[i]) for i in order]
        self._length = [self._length[i] for i in order]
        self._last = [self._last[i] for i in order]
        self.batch_size = len(order)

    # -- the model, per lane ---------------------------------------------------------------------

    def _fold(self, lane: _Lane, k: np.ndarray, v: np.ndarray, p: int) -> None:
        if isinstance(self.rule, rules.Drop):
            return
        k = k if self.rope is None else rotate(self.rope, k, -p)
        if lane.merge is not None:
            lane.merge.fold(k, v, p)
        else:
            lane.folded.append((k, v, p))
        lane.slots = None

    def _evict(self, lane: _Lane) -> int:
        """The window index to fold when the window holds window + 1 candidates."""
        if self.retain == "fifo":
            return 0
        older = len(lane.score) - self.recent  # h2o: the recent newest are kept
        score = np.where(np.isnan(lane.score[:older]), np.inf, lane.score[:older])
        return int(np.argmin(score))  # the lowest; the first (oldest) among equals

    def _place(self, b: int, lane: _Lane, k: np.ndarray, v: np.ndarray, p: int) -> None:
        if self._length[b] < self.sinks:
            lane.sink_k, lane.sink_v = np.vstack([lane.sink_k, k]), np.vstack([lane.sink_v, v])
            return
        lane.k, lane.v = np.vstack([lane.k, k]), np.vstack([lane.v, v])
        lane.position, lane.score = np.append(lane.position, p), np.append(lane.score, np.nan)
        if len(lane.score) > self.window:
            e = self._evict(lane)
            self._fold(lane, lane.k[e], lane.v[e], int(lane.position[e]))
            keep = np.arange(len(lane.score)) != e
            lane.k, lane.v, lane.position, lane.score = (
                lane.k[keep],
                lane.v[keep],
                lane.position[keep],
                lane.score[keep],
            )

    def _slots(self, lane: _Lane) -> List[Slot]:
        if lane.slots is None:
            if lane.merge is not None and isinstance(self.rule, rules.Merge):
                lane.slots = merge_slots(self.rule, lane.merge)
            else:
                lane.slots = memory_slots(self.rule, lane.folded, lane.head)
        return lane.slots

    def _visible(self, lane: _Lane) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A lane's [sinks | slots | window] as attention reads it: keys, values, logit bias."""
        slots = self._slots(lane)
        dk, dv = self.head_dim, self.value_dim
        sk = np.array([s.key for s in slots]).reshape(-1, dk)
        if self.rope is not None and slots:
            sk = rotate(self.rope, sk, np.array([s.position for s in slots]))
        sv = np.array([s.value for s in slots]).reshape(-1, dv)
        bias = np.concatenate([np.zeros(len(lane.sink_k)), [s.bias for s in slots], np.zeros(len(lane.k))])
        return np.vstack([lane.sink_k, sk, lane.k]), np.vstack([lane.sink_v, sv, lane.v]), bias

    def _attend(self, lane: _Lane, q: np.ndarray) -> np.ndarray:
        """q (G, d_k), the query heads of this KV head -> (G, d_v); records the window's weights."""
        keys, values, bias = self._visible(lane)
        if len(keys) == 0:
            return np.zeros((len(q), self.value_dim))
        w = softmax_weights(q, keys, self.scale, bias)
        if self.retain != "fifo" and len(lane.score):
            weight = w[:, len(keys) - len(lane.score) :].mean(axis=0)  # averaged over the query heads
            lane.score = weight if self.retain == "tova" else np.nan_to_num(lane.score) + weight
        return w @ values

    # -- the API ---------------------------------------------------------------------------------

    def update(self, k: np.ndarray, v: np.ndarray, positions: Any = None) -> None:
        k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
        single = k.ndim == 3
        if single:
            k, v = k[:, :, None], v[:, :, None]
        B, H, T = k.shape[:3]
        if k.shape != (self.batch_size, self.num_heads, T, self.head_dim) or v.shape != (B, H, T, self.value_dim):
            raise ValueError(
                f"k, v: expected (B={self.batch_size}, H={self.num_heads}, T, {self.head_dim} / "
                f"{self.value_dim}), got {k.shape} and {v.shape}"
            )
        pos = check_positions(positions, self._last, self._length, T, single)
        for b in range(B):
            for t in range(T):
                for h, lane in enumerate(self.lanes[b]):
                    self._place(b, lane, k[b, h, t], v[b, h, t], int(pos[b, t]))
                self._length[b] += 1
                self._last[b] = int(pos[b, t])

    def attend(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, np.float64)
        G = self.num_query_heads // self.num_heads
        out = np.zeros((self.batch_size, self.num_query_heads, self.value_dim))
        for b in range(self.batch_size):
            for h, lane in enumerate(self.lanes[b]):
                out[b, h * G : (h + 1) * G] = self._attend(lane, q[b, h * G : (h + 1) * G])
        return out

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: Any = None) -> np.ndarray:
        self.update(k, v, positions)
        return self.attend(q)

    def forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: Any = None) -> np.ndarray:
        pos = check_positions(positions, self._last, self._length, np.shape(q)[2], False)
        q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
        return np.stack([self.step(q[:, :, t], k[:, :, t], v[:, :, t], pos[:, t]) for t in range(q.shape[2])], axis=2)

    def memory(self) -> Tuple[np.ndarray, np.ndarray]:
        """The slots as folded (un-rotated with a RoPE), zero-padded to the rule's slot count."""
        n = max_slots(self.rule)
        keys = np.zeros((self.batch_size, self.num_heads, n, self.head_dim))
        values = np.zeros((self.batch_size, self.num_heads, n, self.value_dim))
        for b in range(self.batch_size):
            for h, lane in enumerate(self.lanes[b]):
                for i, slot in enumerate(self._slots(lane)):
                    keys[b, h, i], values[b, h, i] = slot.key, slot.value
        return keys, values

    @property
    def visible_size(self) -> int:
        return max(len(self._visible(lane)[0]) for row in self.lanes for lane in row)

    def visible(self, out: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """keys (B, H, n, d_k), values (B, H, n, d_v), mask (B, n): each row's visible set, padded; written
        into ``out`` (two arrays with at least n rows) when given."""
        n = self.visible_size
        keys = np.zeros((self.batch_size, self.num_heads, n, self.head_dim)) if out is None else out[0]
        values = np.zeros((self.batch_size, self.num_heads, n, self.value_dim)) if out is None else out[1]
        mask = np.zeros((self.batch_size, keys.shape[2]), dtype=bool)
        keys[...], values[...] = 0, 0
        for b in range(self.batch_size):
            for h, lane in enumerate(self.lanes[b]):
                k, v, _ = self._visible(lane)
                keys[b, h, : len(k)], values[b, h, : len(k)] = k, v
                mask[b, : len(k)] = True
        return keys, values, mask

    def visible_bias(self) -> np.ndarray:
        """(B, H, n): the logit bias attention adds to each visible pair (ln n for a Merge slot with
        bias="log_count", else 0), padded with 0."""
        bias = np.zeros((self.batch_size, self.num_heads, self.visible_size))
        for b in range(self.batch_size):
            for h, lane in enumerate(self.lanes[b]):
                x = self._visible(lane)[2]
                bias[b, h, : len(x)] = x
        return bias
