"""Update rules: how an evicted key/value pair is folded into the fixed-size memory.

``Mem = Update(S_kv, Mem_pre)``. Each rule is a small frozen dataclass; its parameters are checked by
the C++ core when the rule is made, so a bad rule fails before any cache exists. Index ``i`` counts
the pairs folded so far in a row (0-based); ``kv`` stands for the key and the value vector, each
updated the same way.

Summary rules (Drop, Cumulative, Moving, Weighted, EMA, Compressive, GRU, Custom) hold key/value
slots that softmax attention reads like any other pair. Matrix rules (Linear, Gated, Delta,
GatedDelta: the linear-attention family, as ONNX LinearAttention defines it) hold S (d_k x d_v) per
head and are read linearly.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Type, Union

import numpy as np

from . import _core
from ._checks import integer

__all__ = [
    "Rule",
    "Drop",
    "Cumulative",
    "Moving",
    "Weighted",
    "EMA",
    "Compressive",
    "Merge",
    "GRU",
    "Linear",
    "Gated",
    "Delta",
    "GatedDelta",
    "Custom",
    "from_spec",
]

Reals = Union[float, Tuple[Any, ...]]  # a real number, or nested tuples of them


def _real(rule: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{rule}: {name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _frozen(a: np.ndarray) -> Reals:
    """A float, or nested tuples of floats: hashable, comparable, readable in a repr."""
    return float(a) if a.ndim == 0 else tuple(_frozen(x) for x in a)


def _array(what: str, value: Any) -> np.ndarray:
    """``np.asarray(value)``; ValueError naming ``what`` if the nesting is ragged."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # NumPy before 1.24 only warns about ragged nesting
            return np.asarray(value)
    except (ValueError, Warning) as e:
        raise ValueError(f"{what} must be a regular array of real numbers: {e}") from None


def _reals(rule: str, name: str, value: Any) -> Optional[Reals]:
    """None, a real number or an array-like of them, as _frozen gives it."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(
            f"{rule}: {name} must be a real number or an array of them, got {type(value).__name__} {value!r}"
        )
    a = _array(f"{rule}: {name}", value)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{rule}: {name} must be real numbers, got dtype {a.dtype}")
    return _frozen(a.astype(np.float64))


@dataclass(frozen=True)
class Rule:
    """Base of every rule. ``kind`` names it in the C++ core and in saved state; ``matrix`` is true for
    the linear-attention family, whose memory is a d_k x d_v matrix read linearly, not key/value slots."""

    kind: ClassVar[str] = ""
    matrix: ClassVar[bool] = False

    @property
    def per_token_gates(self) -> Tuple[str, ...]:
        """The keyword gates (``"decay"``, ``"beta"``) every update must bring: those the rule uses
        and was not given as constants."""
        return tuple(
            name for name in ("decay", "beta") if name in {f.name for f in fields(self)} and getattr(self, name) is None
        )

    def __post_init__(self) -> None:
        _core._check_rule(self._spec())

    def _spec(self) -> Tuple[str, Dict[str, Any], Dict[str, str], Any]:
        """``(kind, arrays, options, fn)``: numbers as float64 arrays, strings and flags as options."""
        arrays: Dict[str, Any] = {}
        options: Dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or callable(value):
                continue
            if isinstance(value, bool):
                options[f.name] = "true" if value else "false"
            elif isinstance(value, str):
                options[f.name] = value
            else:
                arrays[f.name] = np.asarray(value, dtype=np.float64)
        return (self.kind, arrays, options, None)

    @classmethod
    def _from_spec(cls, arrays: Dict[str, np.ndarray], options: Dict[str, str]) -> "Rule":
        cls._check_names(arrays, options)
        args: Dict[str, Any] = {}
        for f in fields(cls):
            if f.name in options:
                args[f.name] = options[f.name] == "true" if f.type == "bool" else options[f.name]
            elif f.name in arrays:
                a = np.asarray(arrays[f.name])
                args[f.name] = int(a) if f.type == "int" else _frozen(a)
        return cls(**args)

    @classmethod
    def _check_names(cls, arrays: Dict[str, Any], options: Dict[str, Any]) -> None:
        """A spec carries only the rule's own fields: anything else (a typo, a newer version's
        parameter) is refused rather than dropped."""
        known = {f.name for f in fields(cls)}
        for name in [*arrays, *options]:
            if name not in known:
                raise ValueError(
                    f"{cls.__name__}: takes no parameter {name!r} (its parameters: "
                    f"{', '.join(sorted(known)) or 'none'})"
                )


@dataclass(frozen=True)
class Drop(Rule):
    """Evicted pairs are discarded: a sliding window; with ``sinks`` it is StreamingLLM. 0 slots."""

    kind: ClassVar[str] = "drop"


@dataclass(frozen=True)
class Cumulative(Rule):
    """``Mem_i = (kv_i + i * Mem_{i-1}) / (i + 1)``: the mean of every folded pair. 1 slot.

    The running sum is kept in float64, so the mean stays exact over long streams."""

    kind: ClassVar[str] = "cumulative"


@dataclass(frozen=True)
class Moving(Rule):
    """The mean of the last ``n`` folded pairs (of all of them while fewer than ``n``). 1 slot, O(d) per fold."""

    n: int
    kind: ClassVar[str] = "moving"

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", integer("Moving: n", self.n))
        super().__post_init__()


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


@dataclass(frozen=True)
class EMA(Rule):
    """The first folded pair sets Mem; then ``Mem_i = (1 - alpha) * Mem_{i-1} + alpha * kv_i``. 1 slot."""

    alpha: float
    kind: ClassVar[str] = "ema"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _real("EMA", "alpha", self.alpha))
        super().__post_init__()


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


def _matrix(rule: Rule, name: str) -> None:
    object.__setattr__(rule, name, _reals(type(rule).__name__, name, getattr(rule, name)))


@dataclass(frozen=True)
class Linear(Rule):
    """Linear attention: ``S_t = S_{t-1} + k_t v_t^T``, read ``o_t = scale * q_t^T S_t``. A matrix rule.

    With a feature map phi (``"identity"``, ``"elu1"`` = elu(x) + 1, ``"relu"``) keys and queries are
    mapped first; ``normalize=True`` also keeps ``z_t = z_{t-1} + phi(k_t)`` and reads
    ``o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)`` (no scale; meant for a positive feature map).
    ``mix`` (scalar or (Hq,)) is the Infini-attention logit m used with sinks or a window:
    ``o = sigmoid(m) o_memory + (1 - sigmoid(m)) o_local``."""

    feature_map: str = "identity"
    normalize: bool = False
    eps: float = 1e-6
    mix: Reals = 0.0
    kind: ClassVar[str] = "linear"
    matrix: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.feature_map, str):
            raise TypeError(
                f"Linear: feature_map must be 'identity', 'elu1' or 'relu', got {type(self.feature_map).__name__}"
            )
        if not isinstance(self.normalize, bool):
            raise TypeError(f"Linear: normalize must be True or False, got {type(self.normalize).__name__}")
        object.__setattr__(self, "eps", _real("Linear", "eps", self.eps))
        _matrix(self, "mix")
        super().__post_init__()


@dataclass(frozen=True)
class Gated(Rule):
    """Gated linear attention: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, read ``o_t = scale * q_t^T S_t``.

    g is log-space, per KV head or per key dimension (it scales the rows of S). ``decay`` of shape
    (H,) or (H, d_k) is a constant g for every token (RetNet-style); without it every token brings
    its own: ``update(k, v, decay=g)``. ``mix``: see ``Linear``. A matrix rule."""

    decay: Optional[Reals] = None
    mix: Reals = 0.0
    kind: ClassVar[str] = "gated"
    matrix: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _matrix(self, "decay")
        _matrix(self, "mix")
        super().__post_init__()


@dataclass(frozen=True)
class Delta(Rule):
    """The delta rule: ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, read ``o_t = scale * q_t^T S_t``.

    ``beta`` (a scalar or (H,)) is a constant for every token; without it every token brings its own:
    ``update(k, v, beta=b)``. ``mix``: see ``Linear``. A matrix rule."""

    beta: Optional[Reals] = None
    mix: Reals = 0.0
    kind: ClassVar[str] = "delta"
    matrix: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _matrix(self, "beta")
        _matrix(self, "mix")
        super().__post_init__()


@dataclass(frozen=True)
class GatedDelta(Rule):
    """The gated delta rule:
    ``S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T``, read ``o_t = scale * q_t^T S_t``.

    ``decay`` as in ``Gated``, ``beta`` as in ``Delta``: constants of the rule, or per token.
    ``mix``: see ``Linear``. A matrix rule."""

    decay: Optional[Reals] = None
    beta: Optional[Reals] = None
    mix: Reals = 0.0
    kind: ClassVar[str] = "gated_delta"
    matrix: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _matrix(self, "decay")
        _matrix(self, "beta")
        _matrix(self, "mix")
        super().__post_init__()


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


_KINDS: Dict[str, Type[Rule]] = {
    cls.kind: cls
    for cls in (Drop, Cumulative, Moving, Weighted, EMA, Compressive, Merge, GRU, Linear, Gated, Delta, GatedDelta)
}


def from_spec(spec: Tuple[str, Dict[str, np.ndarray], Dict[str, str], Any]) -> Rule:
    """The rule a ``(kind, arrays, options, fn)`` spec describes (as stored in saved state)."""
    kind, arrays, options, _ = spec
    if kind == "custom":
        raise ValueError("rule: a Custom rule cannot be rebuilt from a spec (its function is Python code)")
    if kind not in _KINDS:
        raise ValueError(f"rule: unknown kind {kind!r}")
    return _KINDS[kind]._from_spec(arrays, options)
