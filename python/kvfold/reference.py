"""A plain NumPy model of kvfold, written from the formulas: slow, float64, obviously right.

It keeps every pair it was given and derives sinks, window and memory from that history at each
call, so it shares no state logic with the C++ core. Tests compare every C++ path against it.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from . import rules

Pair = Tuple[np.ndarray, np.ndarray]  # keys (H, d_k), values (H, d_v) of one token
# a pair and its gates: decay (H,) or (H, d_k), beta (H,), None where the token brought none
Token = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]


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
        betas = np.asarray(rule.betas, dtype=np.float64)
        w = betas[len(betas) - len(last) :] / betas.max()  # only ratios matter; scaled, sums stay finite
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
    if isinstance(rule, rules.GRU):
        dk = folded[0][0].shape[-1]
        h = np.zeros((folded[0][0].shape[0], dk + folded[0][1].shape[-1]))
        for k, v in folded:
            h = np.stack([gru_cell(rule, head, np.concatenate([k[head], v[head]]), h[head]) for head in range(len(h))])
        return [(h[:, :dk], h[:, dk:])]
    if isinstance(rule, rules.Custom):
        (H, dk), dv = folded[0][0].shape, folded[0][1].shape[-1]
        mem_k, mem_v = np.zeros((H, rule.slots, dk)), np.zeros((H, rule.slots, dv))
        for i, (k, v) in enumerate(folded):
            mem_k, mem_v = (np.asarray(x, np.float64) for x in rule.fn(mem_k.copy(), mem_v.copy(), k, v, i))
        return [(mem_k[:, s], mem_v[:, s]) for s in range(rule.slots)]
    raise TypeError(f"reference: no model of {type(rule).__name__}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def gru_cell(rule: rules.GRU, head: int, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """torch.nn.GRUCell for KV head ``head``: gate order r, z, n."""

    D = len(h)
    w_ih = np.asarray(rule.weight_ih, np.float64)
    w_hh = np.asarray(rule.weight_hh, np.float64)
    if w_ih.ndim == 3:
        w_ih, w_hh = w_ih[head], w_hh[head]
    b_ih = np.zeros(3 * D) if rule.bias_ih is None else np.asarray(rule.bias_ih, np.float64)
    b_hh = np.zeros(3 * D) if rule.bias_hh is None else np.asarray(rule.bias_hh, np.float64)
    if b_ih.ndim == 2:
        b_ih = b_ih[head]
    if b_hh.ndim == 2:
        b_hh = b_hh[head]
    gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
    r = _sigmoid(gi[:D] + gh[:D])
    z = _sigmoid(gi[D : 2 * D] + gh[D : 2 * D])
    n = np.tanh(gi[2 * D :] + r * gh[2 * D :])
    return (1 - z) * n + z * h


MATRIX_RULES = (rules.Linear, rules.Gated, rules.Delta, rules.GatedDelta)


def feature_map(name: str, x: np.ndarray) -> np.ndarray:
    if name == "elu1":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if name == "relu":
        return np.maximum(x, 0.0)
    return x


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
    H, dk = k.shape
    if isinstance(rule, rules.Linear):
        phi = feature_map(rule.feature_map, k)
        S = S + phi[:, :, None] * v[:, None, :]
        return S, (None if z is None else z + phi)
    gated = isinstance(rule, (rules.Gated, rules.GatedDelta))
    delta = isinstance(rule, (rules.Delta, rules.GatedDelta))
    if gated:
        g = np.asarray(rule.decay if rule.decay is not None else decay, np.float64)
        a = np.broadcast_to(np.exp(g).reshape(H, -1), (H, dk))
        S = a[:, :, None] * S  # S_t = exp(g_t) S_{t-1} ...
    u = v
    if delta:
        b = np.broadcast_to(np.asarray(rule.beta if rule.beta is not None else beta, np.float64), (H,))
        u = b[:, None] * (v - np.einsum("hkv,hk->hv", S, k))  # beta_t (v_t - S'^T k_t)
    return S + k[:, :, None] * u[:, None, :], z


def matrix_read(rule: rules.Rule, S: np.ndarray, z: Optional[np.ndarray], q: np.ndarray, scale: float) -> np.ndarray:
    """o = scale q^T S, or phi(q)^T S / (phi(q)^T z + eps) for normalized Linear: q (d_k,), S (d_k, d_v)."""
    if isinstance(rule, rules.Linear):
        phi = feature_map(rule.feature_map, q)
        if rule.normalize:
            return (phi @ S) / (phi @ z + rule.eps)
        return scale * (phi @ S)
    return scale * (q @ S)


def softmax_attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """q (d_k,), keys (n, d_k), values (n, d_v) -> (d_v,); zeros when n == 0."""
    if len(keys) == 0:
        return np.zeros(values.shape[-1])
    s = scale * (keys @ q)
    w = np.exp(s - s.max())
    return (w / w.sum()) @ values


class ReferenceCache:
    """The same model and API as ``kvfold.MemoryCache`` (update, attend, step, forward, memory,
    load_memory, visible, reset, length), in float64.

    Matrix rules: S is read linearly; with sinks or a window the read is mixed with softmax
    attention over [sinks | window], ``o = sigmoid(m) o_memory + (1 - sigmoid(m)) o_local``."""

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
        # per row: (k (H, d_k), v (H, d_v), decay (H,) / (H, d_k) / None, beta (H,) / None) per token
        self.history: List[List[Token]] = [[] for _ in range(batch_size)]
        # per row: a state set by load_memory, (S, z, pairs folded before it) or None
        self.loaded: List[Optional[Tuple[np.ndarray, Optional[np.ndarray], int]]] = [None] * batch_size

    @property
    def matrix(self) -> bool:
        return isinstance(self.rule, MATRIX_RULES)

    @property
    def normalized(self) -> bool:
        return isinstance(self.rule, rules.Linear) and self.rule.normalize

    @property
    def length(self) -> np.ndarray:
        return np.array([len(h) for h in self.history], dtype=np.int64)

    def _split(self, b: int) -> Tuple[List[Token], List[Token], List[Token]]:
        """Row b's history as (sinks, folded, window)."""
        h = self.history[b]
        sinks, rest = h[: self.sinks], h[self.sinks :]
        cut = max(len(rest) - self.window, 0)
        return sinks, rest[:cut], rest[cut:]

    def update(
        self, k: np.ndarray, v: np.ndarray, decay: Optional[np.ndarray] = None, beta: Optional[np.ndarray] = None
    ) -> None:
        k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
        single = k.ndim == 3
        if single:
            k, v = k[:, :, None], v[:, :, None]
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

    def _matrix_state(self, b: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Row b's S (H, d_k, d_v) and z (H, d_k), folding from a loaded state if there is one."""
        folded = self._split(b)[1]
        S = np.zeros((self.num_heads, self.head_dim, self.value_dim))
        z = np.zeros((self.num_heads, self.head_dim)) if self.normalized else None
        start = 0
        if self.loaded[b] is not None:
            S, z, start = self.loaded[b]
        for k, v, g, bt in folded[start:]:
            S, z = matrix_fold(self.rule, S, z, k, v, g, bt)
        return S, z

    def memory(self) -> Any:
        if self.matrix:
            states = [self._matrix_state(b) for b in range(self.batch_size)]
            S = np.stack([s for s, _ in states])
            return (S, np.stack([z for _, z in states])) if self.normalized else S
        slots = {
            rules.Drop: 0,
            rules.Compressive: getattr(self.rule, "slots", 0),
            rules.Custom: getattr(self.rule, "slots", 0),
        }.get(type(self.rule), 1)
        keys = np.zeros((self.batch_size, self.num_heads, slots, self.head_dim))
        values = np.zeros((self.batch_size, self.num_heads, slots, self.value_dim))
        for b in range(self.batch_size):
            for s, (mk, mv) in enumerate(fold_memory(self.rule, [(p[0], p[1]) for p in self._split(b)[1]])):
                keys[b, :, s], values[b, :, s] = mk, mv
        return keys, values

    def load_memory(self, S: np.ndarray, z: Optional[np.ndarray] = None) -> None:
        for b in range(self.batch_size):
            self.loaded[b] = (
                np.asarray(S[b], np.float64).copy(),
                None if z is None else np.asarray(z[b], np.float64).copy(),
                len(self._split(b)[1]),
            )

    def visible_row(self, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """Row b's visible set [sinks | slots | window], oldest first: (H, n, d_k), (H, n, d_v)."""
        sinks, folded, window = self._split(b)
        slots = [] if self.matrix else fold_memory(self.rule, [(p[0], p[1]) for p in folded])
        pairs = [(p[0], p[1]) for p in sinks] + slots + [(p[0], p[1]) for p in window]
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
        mix = _sigmoid(np.broadcast_to(np.asarray(getattr(self.rule, "mix", 0.0), np.float64), (self.num_query_heads,)))
        for b in range(self.batch_size):
            keys, values = self.visible_row(b)
            S, z = self._matrix_state(b) if self.matrix else (None, None)
            for hq in range(self.num_query_heads):
                h = hq // group
                local = softmax_attend(q[b, hq], keys[h], values[h], self.scale)
                if not self.matrix:
                    out[b, hq] = local
                    continue
                memory = matrix_read(self.rule, S[h], None if z is None else z[h], q[b, hq], self.scale)
                out[b, hq] = (
                    memory if self.sinks == 0 and self.window == 0 else mix[hq] * memory + (1 - mix[hq]) * local
                )
        return out

    def step(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        decay: Optional[np.ndarray] = None,
        beta: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        self.update(k, v, decay, beta)
        return self.attend(q)

    def forward(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        decay: Optional[np.ndarray] = None,
        beta: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        steps = [
            self.step(
                q[:, :, t],
                k[:, :, t],
                v[:, :, t],
                None if decay is None else decay[:, :, t],
                None if beta is None else beta[:, :, t],
            )
            for t in range(q.shape[2])
        ]
        return np.stack(steps, axis=2)

    def reset(self, rows: Optional[List[int]] = None) -> None:
        for b in range(self.batch_size) if rows is None else rows:
            self.history[b] = []
            self.loaded[b] = None
