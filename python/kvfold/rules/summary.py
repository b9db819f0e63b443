"""The summary rules: their memory is key/value slots that softmax attention reads like any other pair.
Each rule's NumPy reference fold (``reference_fold``, float64, from the formula in its docstring) stands
beside its definition."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import numpy as np

from .._checks import integer
from ._base import Pair, Rule, _array, _real

# The rules kvfold.rules exports (a new rule adds its class here).
__all__ = ["Drop", "Cumulative", "Moving", "Weighted", "EMA", "Compressive", "Merge", "GRU", "Custom"]


@dataclass(frozen=True)
class Drop(Rule):
    """Evicted pairs are discarded: a sliding window; with ``sinks`` it is StreamingLLM. 0 slots."""

    kind: ClassVar[str] = "drop"

    @property
    def max_slots(self) -> int:
        return 0

    @property
    def averages_pairs(self) -> bool:
        return True

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        return []


@dataclass(frozen=True)
class Cumulative(Rule):
    """``Mem_i = (kv_i + i * Mem_{i-1}) / (i + 1)``: the mean of every folded pair. 1 slot.

    The running sum is kept in float64, so the mean stays exact over long streams."""

    kind: ClassVar[str] = "cumulative"

    @property
    def averages_pairs(self) -> bool:
        return True

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        mem = folded[0]
        for i, (k, v) in enumerate(folded[1:], start=1):  # Mem_i = (kv_i + i * Mem_{i-1}) / (i + 1)
            mem = ((k + i * mem[0]) / (i + 1), (v + i * mem[1]) / (i + 1))
        return [mem]


@dataclass(frozen=True)
class Moving(Rule):
    """The mean of the last ``n`` folded pairs (of all of them while fewer than ``n``). 1 slot, O(d) per fold."""

    n: int
    kind: ClassVar[str] = "moving"

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", integer("Moving: n", self.n))
        super().__post_init__()

    @property
    def averages_pairs(self) -> bool:
        return True

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        last = folded[-self.n :]
        return [(np.mean([k for k, _ in last], axis=0), np.mean([v for _, v in last], axis=0))]


@dataclass(frozen=True)
class Weighted(Rule):
    """``Mem = sum_j beta_{j-i+n} kv_j / sum(beta)`` over the last ``n = len(betas)`` folded pairs.

    ``betas[0]`` weighs the oldest pair, ``betas[-1]`` the newest. While only ``m < n`` pairs are
    folded, the newest ``m`` weights are used and normalised by their sum. Weights are finite and
    >= 0, and ``betas[-1] > 0`` so every partial window has weight. 1 slot."""

    betas: Tuple[float, ...]
    kind: ClassVar[str] = "weighted"

    def __post_init__(self) -> None:
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__"):
            raise TypeError(f"Weighted: betas must be a sequence of real numbers, got {type(betas).__name__}")
        values = betas.tolist() if isinstance(betas, np.ndarray) else list(betas)
        object.__setattr__(self, "betas", tuple(_real("Weighted", f"betas[{i}]", b) for i, b in enumerate(values)))
        super().__post_init__()

    @property
    def averages_pairs(self) -> bool:
        return True

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        last = folded[-len(self.betas) :]
        betas = np.asarray(self.betas, dtype=np.float64)
        w = betas[len(betas) - len(last) :] / betas.max()  # only ratios matter; scaled, sums stay finite
        return [
            (sum(wi * k for wi, (k, _) in zip(w, last)) / w.sum(), sum(wi * v for wi, (_, v) in zip(w, last)) / w.sum())
        ]


@dataclass(frozen=True)
class EMA(Rule):
    """The first folded pair sets Mem; then ``Mem_i = (1 - alpha) * Mem_{i-1} + alpha * kv_i``. 1 slot."""

    alpha: float
    kind: ClassVar[str] = "ema"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _real("EMA", "alpha", self.alpha))
        super().__post_init__()

    @property
    def averages_pairs(self) -> bool:
        return True

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        mem, a = folded[0], self.alpha
        for k, v in folded[1:]:
            mem = ((1 - a) * mem[0] + a * k, (1 - a) * mem[1] + a * v)
        return [mem]


@dataclass(frozen=True)
class Compressive(Rule):
    """The Compressive Transformer's memory: every ``rate`` folded pairs are pooled (``"mean"`` or
    ``"max"``, elementwise) into one compressed pair, in a FIFO of at most ``slots``.

    The newest compressed pair is open: until it holds ``rate`` pairs it shows the pool of what it
    holds, so nothing folded is ever invisible. Up to ``slots`` slots."""

    slots: int
    rate: int
    pool: str = "mean"
    kind: ClassVar[str] = "compressive"

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", integer("Compressive: slots", self.slots))
        object.__setattr__(self, "rate", integer("Compressive: rate", self.rate))
        if not isinstance(self.pool, str):
            raise TypeError(f"Compressive: pool must be 'mean' or 'max', got {type(self.pool).__name__}")
        super().__post_init__()

    @property
    def max_slots(self) -> int:
        return self.slots

    @property
    def averages_pairs(self) -> bool:
        return self.pool == "mean"

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        pool = np.mean if self.pool == "mean" else np.max
        groups = [folded[i : i + self.rate] for i in range(0, len(folded), self.rate)]
        return [(pool([k for k, _ in g], axis=0), pool([v for _, v in g], axis=0)) for g in groups[-self.slots :]]


@dataclass(frozen=True)
class Merge(Rule):
    """Token merging as the memory: up to ``slots`` slots, each the sum of the pairs merged into it.

    Slot s holds float64 sums ``Sk``, ``Sv``, a count ``n`` and a position sum ``Sp``. A folded pair
    becomes a new slot at the end; when that makes ``slots + 1``, the two slots whose mean keys
    (``Sk / n``) have the highest cosine similarity merge: sums, counts and position sums add, the
    merged slot takes the lower index and the later slots move down (ties: the first pair (i, j),
    i < j, in row-major order; the cosine with a zero key is 0). Attention reads slot s as the pair
    ``(Sk / n, Sv / n)``; with ``bias="log_count"`` its logit gets ``+ ln n``, so a slot weighs as
    the n pairs it stands for would if their keys were equal (Token Merging's proportional
    attention); ``bias=None`` reads it as one pair. Up to ``slots`` slots."""

    slots: int
    bias: Optional[str] = "log_count"
    kind: ClassVar[str] = "merge"

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", integer("Merge: slots", self.slots))
        if self.bias is not None and not isinstance(self.bias, str):
            raise TypeError(f"Merge: bias must be 'log_count' or None, got {type(self.bias).__name__} {self.bias!r}")
        if self.bias not in (None, "log_count"):
            raise ValueError(f"Merge: bias must be 'log_count' or None, got {self.bias!r}")
        super().__post_init__()

    def _spec(self) -> Tuple[str, Dict[str, Any], Dict[str, str], Any]:
        kind, arrays, options, fn = super()._spec()
        options["bias"] = self.bias or "none"
        return (kind, arrays, options, fn)

    @classmethod
    def _from_spec(cls, arrays: Dict[str, np.ndarray], options: Dict[str, str]) -> "Rule":
        cls._check_names(arrays, options)
        bias = options.get("bias", "none")
        return cls(int(np.asarray(arrays["slots"])), None if bias == "none" else bias)

    @property
    def max_slots(self) -> int:
        return self.slots

    @property
    def averages_pairs(self) -> bool:
        return True

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        shape_k, shape_v = folded[0][0].shape, folded[0][1].shape
        heads = [MergeSlots(self) for _ in range(int(np.prod(shape_k[:-1])))]  # each lane merges its own slots
        for k, v in folded:
            for merge, k_h, v_h in zip(heads, k.reshape(-1, shape_k[-1]), v.reshape(-1, shape_v[-1])):
                merge.fold(k_h, v_h, 0)
        per_head = [merge.read() for merge in heads]
        return [
            (
                np.stack([h[s][0] for h in per_head]).reshape(shape_k),
                np.stack([h[s][1] for h in per_head]).reshape(shape_v),
            )
            for s in range(len(per_head[0]))
        ]


def cosine_matrix(keys: np.ndarray) -> np.ndarray:
    """Cosine similarity of every two rows of ``keys`` (n, d); 0 where a row is zero."""
    norm = np.linalg.norm(keys, axis=1)
    unit = np.divide(keys, norm[:, None], out=np.zeros_like(keys), where=norm[:, None] > 0)
    return unit @ unit.T


@functools.lru_cache(maxsize=None)
def _lower_triangle(n: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.tril_indices(n)


class MergeSlots:
    """``Merge``'s memory in one lane: slots in order, each ``[Sk, Sv, n, Sp]`` (float64 sums of
    the keys, values and positions of the pairs merged into it, and their count).

    ``fold(k, v, p)`` appends the slot ``[k, v, 1, p]``; when that makes ``rule.slots + 1`` slots, the two
    slots whose mean keys ``Sk / n`` have the highest cosine similarity merge: their sums, counts and
    position sums add, the merged slot takes the lower index, the other is removed and the later slots
    move down. Ties go to the first pair (i, j), i < j, in row-major order; the cosine with a zero mean
    key is 0. ``read()`` gives each slot as ``(Sk / n, Sv / n, Sp / n, n)``."""

    def __init__(self, rule: Merge) -> None:
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


@dataclass(frozen=True, eq=False, repr=False)
class GRU(Rule):
    """A recurrent network as the memory: one slot holds ``h = concat(mem_k, mem_v)`` and each folded
    pair ``x = concat(k, v)`` updates it by ``torch.nn.GRUCell``'s equations (gate order r, z, n)::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    ``weight_ih`` and ``weight_hh`` are ``(3*D, D)`` with ``D = head_dim + value_dim``, shared by every KV
    head, or ``(H, 3*D, D)``, one set per head; biases ``(3*D,)`` or ``(H, 3*D)``, zero when omitted.
    PyTorch's ``GRUCell(D, D)`` parameters load as they are (``cell.weight_ih.detach().numpy()``).
    h starts at zero. Weights are kept as read-only float32 arrays."""

    weight_ih: np.ndarray
    weight_hh: np.ndarray
    bias_ih: Optional[np.ndarray] = None
    bias_hh: Optional[np.ndarray] = None
    kind: ClassVar[str] = "gru"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name.startswith("bias"):
                continue
            if isinstance(value, (str, bytes, bool)) or value is None:
                raise TypeError(f"GRU: {f.name} must be an array of real numbers, got {type(value).__name__}")
            a = _array(f"GRU: {f.name}", value)
            if a.dtype.kind not in "fiu":
                raise TypeError(f"GRU: {f.name} must be an array of real numbers, got dtype {a.dtype}")
            wide = a.astype(np.float64)
            if not np.all(np.abs(wide) <= np.finfo(np.float32).max):
                raise ValueError(
                    f"GRU: {f.name} must hold finite float32 values, got {wide[~(np.abs(wide) <= 3.4e38)][0]}"
                )
            a = wide.astype(np.float32)
            a.setflags(write=False)
            object.__setattr__(self, f.name, a)
        super().__post_init__()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GRU):
            return NotImplemented
        return all(
            (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
            for a, b in ((getattr(self, f.name), getattr(other, f.name)) for f in fields(self))
        )

    def __hash__(self) -> int:
        return hash(
            tuple(None if a is None else (a.shape, a.tobytes()) for a in (getattr(self, f.name) for f in fields(self)))
        )

    def __repr__(self) -> str:
        parts = [
            f"{f.name}={'None' if getattr(self, f.name) is None else f'<float32 {getattr(self, f.name).shape}>'}"
            for f in fields(self)
        ]
        return f"GRU({', '.join(parts)})"

    @classmethod
    def _from_spec(cls, arrays: Dict[str, np.ndarray], options: Dict[str, str]) -> "Rule":
        cls._check_names(arrays, options)
        return cls(**{name: np.asarray(a) for name, a in arrays.items()})

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        dk = folded[0][0].shape[-1]
        h = np.zeros((folded[0][0].shape[0], dk + folded[0][1].shape[-1]))
        for k, v in folded:
            h = np.stack(
                [self.reference_cell(head, np.concatenate([k[head], v[head]]), h[head]) for head in range(len(h))]
            )
        return [(h[:, :dk], h[:, dk:])]

    def reference_cell(self, head: int, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        """torch.nn.GRUCell for KV head ``head``, in float64: gate order r, z, n."""
        D = len(h)
        w_ih = np.asarray(self.weight_ih, np.float64)
        w_hh = np.asarray(self.weight_hh, np.float64)
        if w_ih.ndim == 3:
            w_ih, w_hh = w_ih[head], w_hh[head]
        b_ih = np.zeros(3 * D) if self.bias_ih is None else np.asarray(self.bias_ih, np.float64)
        b_hh = np.zeros(3 * D) if self.bias_hh is None else np.asarray(self.bias_hh, np.float64)
        if b_ih.ndim == 2:
            b_ih = b_ih[head]
        if b_hh.ndim == 2:
            b_hh = b_hh[head]
        gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
        r = sigmoid(gi[:D] + gh[:D])
        z = sigmoid(gi[D : 2 * D] + gh[D : 2 * D])
        n = np.tanh(gi[2 * D :] + r * gh[2 * D :])
        return (1 - z) * n + z * h


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class Custom(Rule):
    """Your own rule: ``fn(mem_k, mem_v, k, v, count) -> (new_mem_k, new_mem_v)`` over NumPy float32
    arrays for one batch row and every KV head: ``mem_k (H, slots, d_k)``, ``mem_v (H, slots, d_v)``,
    ``k (H, d_k)``, ``v (H, d_v)``; ``count`` is the number of pairs folded before this one. The slots
    start at zero. kvfold checks what fn returns (a pair of float arrays of those shapes; a clear
    error otherwise, and the cache stays as it was) and runs everything else in C++.

    fn runs with the GIL while the cache is busy: it must not call methods of the cache it folds for.
    A Custom rule cannot be saved (``to_bytes``, pickle); ``copy()`` works."""

    fn: Callable[..., Any]
    slots: int = 1
    kind: ClassVar[str] = "custom"

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Custom: fn must be callable, got {type(self.fn).__name__}")
        object.__setattr__(self, "slots", integer("Custom: slots", self.slots))
        super().__post_init__()

    def _spec(self) -> Tuple[str, Dict[str, Any], Dict[str, str], Any]:
        kind, arrays, options, _ = super()._spec()
        return (kind, arrays, options, self.fn)

    def __repr__(self) -> str:
        # The function's name, not its address: a repr that is the same in every process.
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        return f"Custom(fn={name}, slots={self.slots})"

    @property
    def max_slots(self) -> int:
        return self.slots

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        (H, dk), dv = folded[0][0].shape, folded[0][1].shape[-1]
        mem_k, mem_v = np.zeros((H, self.slots, dk)), np.zeros((H, self.slots, dv))
        for i, (k, v) in enumerate(folded):
            mem_k, mem_v = (np.asarray(x, np.float64) for x in self.fn(mem_k.copy(), mem_v.copy(), k, v, i))
        return [(mem_k[:, s], mem_v[:, s]) for s in range(self.slots)]
