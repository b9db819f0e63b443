"""Update rules: how an evicted key/value pair is folded into the fixed-size memory.

``Mem = Update(S_kv, Mem_pre)``. Each rule is a small frozen dataclass; its parameters are checked by
the C++ core when the rule is made, so a bad rule fails before any cache exists. Index ``i`` counts
the pairs folded so far in a row (0-based); ``kv`` stands for the key and the value vector, each
updated the same way.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, Tuple

import numpy as np

from . import _core

__all__ = ["Rule", "Drop", "Cumulative", "Moving", "Weighted", "EMA", "Compressive", "from_spec"]


def _real(rule: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{rule}: {name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _integer(rule: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{rule}: {name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


@dataclass(frozen=True)
class Rule:
    """Base of every rule. ``kind`` names it in the C++ core and in saved state."""

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _core._check_rule(self._spec())

    def _arrays(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not isinstance(getattr(self, f.name), str)}

    def _options(self) -> Dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), str)}

    def _spec(self) -> Tuple[str, Dict[str, Any], Dict[str, str], Any]:
        arrays = {name: np.asarray(value, dtype=np.float64) for name, value in self._arrays().items()}
        return (self.kind, arrays, self._options(), None)

    @classmethod
    def _from_spec(cls, arrays: Dict[str, np.ndarray], options: Dict[str, str]) -> "Rule":
        args: Dict[str, Any] = dict(options)
        for f in fields(cls):
            if f.name in arrays:
                a = arrays[f.name]
                args[f.name] = tuple(a.tolist()) if a.ndim else a.item()
        return cls(**args)


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
        object.__setattr__(self, "n", _integer("Moving", "n", self.n))
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
        object.__setattr__(self, "slots", _integer("Compressive", "slots", self.slots))
        object.__setattr__(self, "rate", _integer("Compressive", "rate", self.rate))
        if not isinstance(self.pool, str):
            raise TypeError(f"Compressive: pool must be 'mean' or 'max', got {type(self.pool).__name__}")
        super().__post_init__()


_KINDS: Dict[str, type] = {cls.kind: cls for cls in (Drop, Cumulative, Moving, Weighted, EMA, Compressive)}


def from_spec(spec: Tuple[str, Dict[str, np.ndarray], Dict[str, str], Any]) -> Rule:
    """The rule a ``(kind, arrays, options, fn)`` spec describes (as stored in saved state)."""
    kind, arrays, options, _ = spec
    if kind not in _KINDS:
        raise ValueError(f"rule: unknown kind {kind!r}")
    return _KINDS[kind]._from_spec(arrays, options)
