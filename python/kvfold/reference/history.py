"""``ReferenceCache``: the reference model derived from each row's whole history at every call."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from .. import rules
from ..rules._base import Token
from ..rules.summary import sigmoid
from .attention import Layout, check_positions, rotate, softmax_attend
from .memory import Slot, matrix_fold, matrix_read, max_slots, memory_slots

Gate = Optional[np.ndarray]  # a matrix rule's per-token decay or beta


class ReferenceCache(Layout):
    """The same model and API as ``kvfold.MemoryCache`` (update, attend, step, forward, memory,
    load_memory, visible, reset, length), in float64, derived from the whole history at each call.
    Retention is fifo (``StreamCache`` has every retention); ``rope`` and ``positions`` as described above.

    Matrix rules: S is read linearly; with sinks or a window the read is mixed with softmax
    attention over [sinks | window], ``o = sigmoid(m) o_memory + (1 - sigmoid(m)) o_local``."""

    # per row: (k (H, d_k), v (H, d_v), decay (H,) / (H, d_k) / None, beta (H,) / None) per token
    history: List[List[Token]]
    positions: List[List[int]]  # per row, per token
    # per row: a state set by load_memory, (S, z, pairs folded before it) or None
    loaded: List[Optional[Tuple[np.ndarray, Optional[np.ndarray], int]]]

    @property
    def matrix(self) -> bool:
        return self.rule.matrix

    @property
    def normalized(self) -> bool:
        return isinstance(self.rule, rules.Linear) and self.rule.normalize

    @property
    def length(self) -> np.ndarray:
        return np.array([len(h) for h in self.history], dtype=np.int64)

    def _cut(self, b: int) -> Tuple[int, int]:
        """Row b's history splits at (end of sinks, end of folded): sinks | folded | window."""
        n = len(self.history[b])
        sinks = min(n, self.sinks)
        return sinks, sinks + max(n - sinks - self.window, 0)

    def _split(self, b: int) -> Tuple[List[Token], List[Token], List[Token]]:
        """Row b's history as (sinks, folded, window)."""
        h = self.history[b]
        s, f = self._cut(b)
        return h[:s], h[s:f], h[f:]

    def update(
        self, k: np.ndarray, v: np.ndarray, decay: Gate = None, beta: Gate = None, positions: Any = None
    ) -> None:
        k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
        single = k.ndim == 3
        if single:
            k, v = k[:, :, None], v[:, :, None]
        last = [p[-1] if p else None for p in self.positions]
        pos = check_positions(positions, last, [len(h) for h in self.history], k.shape[2], single)
        g = None if decay is None else np.asarray(decay, np.float64)
        bt = None if beta is None else np.asarray(beta, np.float64)
        if single:  # gates of one token: (B, H[, d_k]) -> (B, H, 1[, d_k])
            g = None if g is None else g[:, :, None]
            bt = None if bt is None else bt[:, :, None]
        for b in range(self.batch_size):
            for t in range(k.shape[2]):
                self.history[b].append(
                    (
                        k[b, :, t].copy(),
                        v[b, :, t].copy(),
                        None if g is None else g[b, :, t].copy(),
                        None if bt is None else bt[b, :, t].copy(),
                    )
                )
                self.positions[b].append(int(pos[b, t]))

    def _matrix_state(self, b: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Row b's S (H, d_k, d_v) and z (H, d_k), folding from a loaded state if there is one."""
        folded = self._split(b)[1]
        S = np.zeros((self.num_heads, self.head_dim, self.value_dim))
        z = np.zeros((self.num_heads, self.head_dim)) if self.normalized else None
        start, loaded = 0, self.loaded[b]
        if loaded is not None:
            S, z, start = loaded
        for k, v, g, bt in folded[start:]:
            S, z = matrix_fold(self.rule, S, z, k, v, g, bt)
        return S, z

    def _slots(self, b: int) -> List[Slot]:
        """Row b's memory: its folded pairs (un-rotated with a RoPE) folded by the rule, with positions."""
        s, f = self._cut(b)
        folded = []
        for (k, v, _, _), p in zip(self.history[b][s:f], self.positions[b][s:f]):
            folded.append((k if self.rope is None else rotate(self.rope, k, -p), v, p))
        return memory_slots(self.rule, folded)

    def memory(self) -> Any:
        """The slots as folded (un-rotated with a RoPE), zero-padded to the rule's slot count."""
        if self.matrix:
            states = [self._matrix_state(b) for b in range(self.batch_size)]
            S = np.stack([s for s, _ in states])
            return (S, np.stack([z for _, z in states if z is not None])) if self.normalized else S
        slots = max_slots(self.rule)
        keys = np.zeros((self.batch_size, self.num_heads, slots, self.head_dim))
        values = np.zeros((self.batch_size, self.num_heads, slots, self.value_dim))
        for b in range(self.batch_size):
            for i, slot in enumerate(self._slots(b)):
                keys[b, :, i], values[b, :, i] = slot.key, slot.value
        return keys, values

    def load_memory(self, S: np.ndarray, z: Optional[np.ndarray] = None) -> None:
        for b in range(self.batch_size):
            self.loaded[b] = (
                np.asarray(S[b], np.float64).copy(),
                None if z is None else np.asarray(z[b], np.float64).copy(),
                len(self._split(b)[1]),
            )

    def visible_row(self, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """Row b's visible set [sinks | slots | window], oldest first, as attention reads it (slot keys
        rotated at the slot's position): keys (H, n, d_k), values (H, n, d_v)."""
        return self.visible_row_biased(b)[:2]

    def visible_row_biased(self, b: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``visible_row`` and the logit bias of each pair, (H, n)."""
        sinks, _, window = self._split(b)
        slots = [] if self.matrix else self._slots(b)
        H = self.num_heads
        keys = [p[0] for p in sinks]
        keys += [s.key if self.rope is None else rotate(self.rope, s.key, s.position) for s in slots]
        keys += [p[0] for p in window]
        values = [p[1] for p in sinks] + [s.value for s in slots] + [p[1] for p in window]
        bias = [np.zeros(H)] * len(sinks) + [np.broadcast_to(s.bias, (H,)) for s in slots] + [np.zeros(H)] * len(window)
        if not keys:
            return np.zeros((H, 0, self.head_dim)), np.zeros((H, 0, self.value_dim)), np.zeros((H, 0))
        return np.stack(keys, axis=1), np.stack(values, axis=1), np.stack(bias, axis=1)

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
        mix = sigmoid(np.broadcast_to(np.asarray(getattr(self.rule, "mix", 0.0), np.float64), (self.num_query_heads,)))
        for b in range(self.batch_size):
            keys, values, bias = self.visible_row_biased(b)
            S, z = self._matrix_state(b) if self.matrix else (None, None)
            for hq in range(self.num_query_heads):
                h = hq // group
                local = softmax_attend(q[b, hq], keys[h], values[h], self.scale, bias[h])
                if not self.matrix:
                    out[b, hq] = local
                    continue
                assert S is not None  # a matrix rule's state
                memory = matrix_read(self.rule, S[h], None if z is None else z[h], q[b, hq], self.scale)
                out[b, hq] = (
                    memory if self.sinks == 0 and self.window == 0 else mix[hq] * memory + (1 - mix[hq]) * local
                )
        return out

    def step(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, decay: Gate = None, beta: Gate = None, positions: Any = None
    ) -> np.ndarray:
        self.update(k, v, decay, beta, positions)
        return self.attend(q)

    def forward(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, decay: Gate = None, beta: Gate = None, positions: Any = None
    ) -> np.ndarray:
        last = [p[-1] if p else None for p in self.positions]
        pos = check_positions(positions, last, [len(h) for h in self.history], q.shape[2], False)
        steps = [
            self.step(
                q[:, :, t],
                k[:, :, t],
                v[:, :, t],
                None if decay is None else decay[:, :, t],
                None if beta is None else beta[:, :, t],
                pos[:, t],
            )
            for t in range(q.shape[2])
        ]
        return np.stack(steps, axis=2)

    def reset(self, rows: Optional[List[int]] = None) -> None:
        if rows is None:
            self.history = [[] for _ in range(self.batch_size)]
            self.positions = [[] for _ in range(self.batch_size)]
            self.loaded = [None] * self.batch_size
            return
        for b in rows:
            self.history[b] = []
            self.positions[b] = []
            self.loaded[b] = None
