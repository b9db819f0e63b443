"""A plain NumPy model of kvfold, written from the formulas: slow, float64, obviously right.

``ReferenceCache`` keeps every pair it was given and derives sinks, window and memory from that
history at each call. ``StreamCache`` keeps the same model incrementally, per batch row and KV head,
for what depends on the queries as well (attention-chosen retention) and for long streams. Neither
shares state logic with the C++ core; tests compare every C++ path against them.

The model, per batch row and KV head (a lane)
=============================================

Tokens arrive in order, each with a key k (d_k), a value v (d_v) and an integer position p.

**Positions.** ``update``, ``step`` and ``forward`` take ``positions=``: (B,) for one token, (B, T) for
a block; integers >= 0 that never go backwards within a row (each at least the row's previous one;
equal positions are allowed). Default: the tokens the row has seen before (0, 1, 2, ...). Positions
matter only to a cache with ``rope``; without it they are checked and otherwise unused.

**Sinks, window, memory.** The first ``sinks`` tokens of a row are sinks, kept exactly forever. Every
later token enters the window, which holds at most ``window`` pairs. When a token enters a full window,
one pair of the window's ``window`` pairs and the new one (the candidates, oldest first) is chosen by
``retain`` and folded into the memory by the rule (with ``window=0`` every non-sink pair is folded at
once). ``update`` of a block of T tokens is T one-token updates in order, so at most one pair is folded
per token. Attention reads ``[sinks | memory slots | window]``, the window oldest first.

**Retention** (``retain=``):

- ``"fifo"``: the oldest candidate is folded (a sliding window; with ``sinks`` StreamingLLM).
- ``"tova"``: every ``attend`` records, for each window pair it reads, its softmax weight averaged
  over the query heads of the KV head (the softmax runs over the whole visible set, sinks and slots
  with their bias included); a later ``attend`` overwrites the record of every pair it reads. A pair no
  ``attend`` has read yet is unscored. The candidate folded is the one with the lowest recorded weight;
  unscored candidates rank above every scored one; among equals the oldest is folded. So ``step`` keeps,
  of the pairs the newest query read plus the new pair, the ``window`` the newest query weighed most
  (the choice TOVA makes, taken when the room is needed); ``update`` without a query between keeps the
  newest unscored pairs, and when every candidate is unscored it is fifo.
- ``"h2o"``: as ``"tova"``, but a pair's record is the sum of the weights of every ``attend`` that read
  it (heavy hitters), and the ``recent`` newest candidates are never folded: the pair folded is the one
  with the lowest sum among the older ``window + 1 - recent`` candidates (unscored above every scored
  one, the oldest among equals). ``recent`` is in [0, window], default ``window // 2``; ``recent=window``
  is fifo.

``step(q, k, v)`` is ``update(k, v)`` then ``attend(q)`` (the token sees itself); ``forward`` is a loop of
``step``. Retention is per batch row and KV head: the lanes of a row may keep different pairs.

**RoPE** (``rope=kvfold.RoPE(theta, dim, layout)``; ``rotate`` below): keys arrive rotated by their
position, and sinks and window keep them so. A pair is folded un-rotated, ``Rot(k, -p)``, with its
position; each slot has a position, and attention reads the slot's key rotated at it, ``Rot(k_slot,
p_slot)`` (fractional positions rotate by ``p * inv_freq`` like any other). A slot's position is the same
average of the folded positions as its key is of the folded keys: the running mean (Cumulative), the
mean of the last n (Moving), the beta-weighted mean (Weighted), the exponential average (EMA), the mean
of each group (Compressive, pool="mean"), ``Sp / n`` (Merge). Rules whose slots are not averages of
pairs refuse ``rope`` with a ValueError: Compressive with pool="max", GRU, Custom and the matrix rules.

**Merge** (``rules.Merge(slots, bias)``): see ``MergeSlots``. Attention adds ``ln n`` to a Merge
slot's logit when ``bias="log_count"``.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import rules
from .rope import RoPE

Pair = Tuple[np.ndarray, np.ndarray]  # keys (H, d_k), values (H, d_v) of one token
# a pair and its gates: decay (H,) or (H, d_k), beta (H,), None where the token brought none
Token = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]

RETAIN = ("fifo", "tova", "h2o")


def rotate(rope: RoPE, x: np.ndarray, positions: Any) -> np.ndarray:
    """``x`` (..., d) rotated by ``rope`` at ``positions`` (broadcast against x's leading dimensions),
    float64: pair i (dimensions i and i + D/2 for layout "half", 2i and 2i + 1 for "interleaved", D the
    rotated dimensions) turns by angle ``p * theta ** (-2 i / D)``; ``rotate(rope, rotate(rope, x, p), -p) == x``."""
    x = np.asarray(x, np.float64)
    D = rope.rotated_dims(x.shape[-1])
    half = D // 2
    angle = np.asarray(positions, np.float64)[..., None] * rope.theta ** (-2.0 * np.arange(half) / D)
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = (slice(0, half), slice(half, D)) if rope.layout == "half" else (slice(0, D, 2), slice(1, D, 2))
    out = x.copy()
    out[..., a] = x[..., a] * cos - x[..., b] * sin
    out[..., b] = x[..., b] * cos + x[..., a] * sin
    return out


def cosine_matrix(keys: np.ndarray) -> np.ndarray:
    """Cosine similarity of every two rows of ``keys`` (n, d); 0 where a row is zero."""
    norm = np.linalg.norm(keys, axis=1)
    unit = np.divide(keys, norm[:, None], out=np.zeros_like(keys), where=norm[:, None] > 0)
    return unit @ unit.T


@functools.lru_cache(maxsize=None)
def _lower_triangle(n: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.tril_indices(n)


class MergeSlots:
    """``rules.Merge``'s memory in one lane: slots in order, each ``[Sk, Sv, n, Sp]`` (float64 sums of
    the keys, values and positions of the pairs merged into it, and their count).

    ``fold(k, v, p)`` appends the slot ``[k, v, 1, p]``; when that makes ``rule.slots + 1`` slots, the two
    slots whose mean keys ``Sk / n`` have the highest cosine similarity merge: their sums, counts and
    position sums add, the merged slot takes the lower index, the other is removed and the later slots
    move down. Ties go to the first pair (i, j), i < j, in row-major order; the cosine with a zero mean
    key is 0. ``read()`` gives each slot as ``(Sk / n, Sv / n, Sp / n, n)``."""

    def __init__(self, rule: rules.Merge) -> None:
        self.rule = rule
        self.slots: List[List[Any]] = []

    def fold(self, k: np.ndarray, v: np.ndarray, p: float) -> None:
        self.slots.append([np.array(k, np.float64), np.array(v, np.float64), 1, float(p)])
        if len(self.slots) <= self.rule.slots:
            return
        c = cosine_matrix(np.stack([s[0] / s[2] for s in self.slots]))
        c[_lower_triangle(len(c))] = -np.inf  # only pairs i < j
        i, j = np.unravel_index(np.argmax(c), c.shape)  # argmax: the first maximum in row-major order
        a, b = self.slots[i], self.slots.pop(j)
        self.slots[i] = [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]]

    def read(self) -> List[Tuple[np.ndarray, np.ndarray, float, int]]:
        return [(sk / n, sv / n, sp / n, n) for sk, sv, n, sp in self.slots]


def fold_memory(rule: rules.Rule, folded: List[Pair]) -> List[Pair]:
    """The memory slots, oldest first, after folding ``folded`` pairs in order."""
    if not folded or isinstance(rule, rules.Drop):
        return []
    if isinstance(rule, rules.Cumulative):
        mem = folded[0]
        for i, (k, v) in enumerate(folded[1:], start=1):  # Mem_i = (kv_i + i * Mem_{i-1}) / (i + 1)
            mem = ((k + i * mem[0]) / (i + 1), (v + i * mem[1]) / (i + 1))
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
        mem, a = folded[0], rule.alpha
        for k, v in folded[1:]:
            mem = ((1 - a) * mem[0] + a * k, (1 - a) * mem[1] + a * v)
        return [mem]
    if isinstance(rule, rules.Compressive):
        pool = np.mean if rule.pool == "mean" else np.max
        groups = [folded[i : i + rule.rate] for i in range(0, len(folded), rule.rate)]
        return [tuple(pool([kv[j] for kv in g], axis=0) for j in (0, 1)) for g in groups[-rule.slots :]]
    if isinstance(rule, rules.Merge):
        return [(s.key, s.value) for s in memory_slots(rule, [(k, v, 0) for k, v in folded])]
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
    if isinstance(rule, (rules.Gated, rules.GatedDelta)):
        g = np.asarray(rule.decay if rule.decay is not None else decay, np.float64)
        a = np.broadcast_to(np.exp(g).reshape(H, -1), (H, dk))
        S = a[:, :, None] * S  # S_t = exp(g_t) S_{t-1} ...
    u = v
    if isinstance(rule, (rules.Delta, rules.GatedDelta)):
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


# Rules whose slots are averages of folded pairs: a slot's position is the same average of the positions.
def _averages_pairs(rule: rules.Rule) -> bool:
    return isinstance(rule, (rules.Drop, rules.Cumulative, rules.Moving, rules.Weighted, rules.EMA, rules.Merge)) or (
        isinstance(rule, rules.Compressive) and rule.pool == "mean"
    )


def check_rope(rule: rules.Rule, rope: Optional[RoPE], head_dim: int) -> None:
    """TypeError/ValueError unless ``rope`` is None or a RoPE that fits ``head_dim`` and ``rule``."""
    if rope is None:
        return
    if not isinstance(rope, RoPE):
        raise TypeError(f"rope: expected a kvfold.RoPE or None, got {type(rope).__name__}")
    rope.rotated_dims(head_dim)
    if not _averages_pairs(rule):
        raise ValueError(
            f"rope: the slots of {rule!r} are not averages of folded pairs, so they have no position to rotate "
            "at; rope works with Drop, Cumulative, Moving, Weighted, EMA, Compressive(pool='mean') and Merge"
        )


class Slot(NamedTuple):
    key: np.ndarray  # as folded: un-rotated when the cache has a RoPE
    value: np.ndarray
    # the average of the folded positions (nan for GRU and Custom); per head, an (H,) array
    position: Union[float, np.ndarray]
    # added to the slot's attention logit: ln n for Merge with bias="log_count", else 0; per head, (H,)
    bias: Union[float, np.ndarray]


def memory_slots(rule: rules.Rule, folded: List[Tuple[np.ndarray, np.ndarray, Any]]) -> List[Slot]:
    """The memory after folding ``(k, v, position)`` triples in order: for the averaging rules the
    position is averaged as a value is (an extra value column); Merge keeps its position sum."""
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
    if not _averages_pairs(rule):
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
    if isinstance(rule, rules.Drop):
        return 0
    return getattr(rule, "slots", 1) if isinstance(rule, (rules.Compressive, rules.Custom, rules.Merge)) else 1


def softmax_weights(q: np.ndarray, keys: np.ndarray, scale: float, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """softmax(scale * keys q + bias): q (..., d_k), keys (n, d_k) -> (..., n)."""
    s = scale * (q @ keys.T) + (0.0 if bias is None else bias)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def softmax_attend(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float, bias: Optional[np.ndarray] = None
) -> np.ndarray:
    """q (d_k,), keys (n, d_k), values (n, d_v) -> (d_v,); zeros when n == 0. ``bias`` (n,) is added
    to the scaled scores."""
    if len(keys) == 0:
        return np.zeros(values.shape[-1])
    return softmax_weights(q, keys, scale, bias) @ values


def check_positions(positions: Any, last: List[Optional[int]], lengths: List[int], T: int, single: bool) -> np.ndarray:
    """Positions of a block as int64 (B, T): the given ones checked, or the tokens each row has seen.
    ``last``: each row's latest position (None before its first token)."""
    B = len(lengths)
    if positions is None:
        p = np.array([[lengths[b] + t for t in range(T)] for b in range(B)], dtype=np.int64).reshape(B, T)
    else:
        p = np.asarray(positions)
        if p.dtype.kind not in "iu":
            raise TypeError(f"positions: expected integers, got dtype {p.dtype}")
        want = (B,) if single else (B, T)
        if p.shape != want:
            raise ValueError(f"positions: expected shape {want}, got {p.shape}")
        p = p.astype(np.int64).reshape(B, T)
    if (p < 0).any():
        raise ValueError(f"positions: expected integers >= 0, got {int(p.min())}")
    for b in range(B):
        row = ([] if last[b] is None else [last[b]]) + p[b].tolist()
        back = [i for i in range(1, len(row)) if row[i] < row[i - 1]]
        if back:
            i = back[0]
            raise ValueError(
                f"positions: row {b} goes backwards, from {row[i - 1]} to {row[i]}; positions never decrease"
            )
    return p


class ReferenceCache:
    """The same model and API as ``kvfold.MemoryCache`` (update, attend, step, forward, memory,
    load_memory, visible, reset, length), in float64, derived from the whole history at each call.
    Retention is fifo (``StreamCache`` has every retention); ``rope`` and ``positions`` as described above.

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
        rope: Optional[RoPE] = None,
    ) -> None:
        self.rule = rules.Drop() if rule is None else rule
        self.num_heads, self.head_dim = num_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.num_query_heads = num_heads if num_query_heads is None else num_query_heads
        self.batch_size, self.window, self.sinks = batch_size, window, sinks
        self.scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
        check_rope(self.rule, rope, head_dim)
        self.rope = rope
        # per row: (k (H, d_k), v (H, d_v), decay (H,) / (H, d_k) / None, beta (H,) / None) per token
        self.history: List[List[Token]] = [[] for _ in range(batch_size)]
        self.positions: List[List[int]] = [[] for _ in range(batch_size)]  # per row, per token
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
        self,
        k: np.ndarray,
        v: np.ndarray,
        decay: Optional[np.ndarray] = None,
        beta: Optional[np.ndarray] = None,
        positions: Any = None,
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
        mix = _sigmoid(np.broadcast_to(np.asarray(getattr(self.rule, "mix", 0.0), np.float64), (self.num_query_heads,)))
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
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        decay: Optional[np.ndarray] = None,
        beta: Optional[np.ndarray] = None,
        positions: Any = None,
    ) -> np.ndarray:
        self.update(k, v, decay, beta, positions)
        return self.attend(q)

    def forward(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        decay: Optional[np.ndarray] = None,
        beta: Optional[np.ndarray] = None,
        positions: Any = None,
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
        for b in range(self.batch_size) if rows is None else rows:
            self.history[b] = []
            self.positions[b] = []
            self.loaded[b] = None


class _Lane:
    """One batch row's KV head in a StreamCache: sinks, the window (oldest first, with positions and
    the recorded weights, NaN while unscored) and the memory."""

    def __init__(self, rule: rules.Rule, dk: int, dv: int) -> None:
        self.sink_k, self.sink_v = np.zeros((0, dk)), np.zeros((0, dv))
        self.k, self.v = np.zeros((0, dk)), np.zeros((0, dv))
        self.position = np.zeros(0, dtype=np.int64)
        self.score = np.zeros(0)
        self.merge = MergeSlots(rule) if isinstance(rule, rules.Merge) else None
        self.folded: List[Tuple[np.ndarray, np.ndarray, int]] = []  # the other rules fold from the list
        self.slots: Optional[List[Slot]] = []  # memo of the memory; None after a fold


class StreamCache:
    """The model above, kept incrementally per batch row and KV head, in float64: every retention
    (``retain="fifo"``, ``"tova"``, ``"h2o"`` with ``recent``), ``rope`` and positions, every summary rule
    (matrix rules: ``ReferenceCache``). The API of ``kvfold.MemoryCache``: update, attend, step, forward,
    memory, visible, visible_size, reset, length; and ``visible_bias()``, the logit bias of each visible pair.
    """

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
        rope: Optional[RoPE] = None,
        retain: str = "fifo",
        recent: Optional[int] = None,
    ) -> None:
        self.rule = rules.Drop() if rule is None else rule
        if not isinstance(self.rule, rules.Rule):
            raise TypeError(f"rule: expected a kvfold.rules rule, got {type(rule).__name__}")
        if self.rule.matrix:
            raise ValueError(f"rule: StreamCache models summary rules; {self.rule!r} is a matrix rule (ReferenceCache)")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.num_query_heads = num_heads if num_query_heads is None else num_query_heads
        if self.num_query_heads % num_heads:
            raise ValueError(
                f"num_query_heads: expected a multiple of num_heads={num_heads}, got {self.num_query_heads}"
            )
        self.batch_size, self.window, self.sinks = batch_size, window, sinks
        self.scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
        check_rope(self.rule, rope, head_dim)
        self.rope = rope
        if retain not in RETAIN:
            raise ValueError(f"retain: expected one of {', '.join(map(repr, RETAIN))}, got {retain!r}")
        self.retain = retain
        if recent is not None and retain != "h2o":
            raise ValueError(
                f"recent: only retain='h2o' keeps a recent part, got recent={recent} with retain={retain!r}"
            )
        self.recent = (window // 2 if recent is None else recent) if retain == "h2o" else 0
        if not 0 <= self.recent <= window:
            raise ValueError(f"recent: expected an integer in [0, window={window}], got {recent}")
        self.reset()

    @property
    def length(self) -> np.ndarray:
        return np.array(self._length, dtype=np.int64)

    def reset(self, rows: Optional[List[int]] = None) -> None:
        if rows is None:
            self._length = [0] * self.batch_size
            self._last: List[Optional[int]] = [None] * self.batch_size
            self.lanes = [
                [_Lane(self.rule, self.head_dim, self.value_dim) for _ in range(self.num_heads)]
                for _ in range(self.batch_size)
            ]
            return
        for b in rows:
            self._length[b], self._last[b] = 0, None
            self.lanes[b] = [_Lane(self.rule, self.head_dim, self.value_dim) for _ in range(self.num_heads)]

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
                lane.slots = memory_slots(self.rule, lane.folded)
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
