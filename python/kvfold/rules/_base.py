"""The base of every rule: its parameters as a spec for the C++ core, the rule registry, and the hooks of
the NumPy reference model (``kvfold.reference``) that each rule fills in beside its definition."""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, Union

import numpy as np

from .. import _core

Reals = Union[float, Tuple[Any, ...]]  # a real number, or nested tuples of them
Pair = Tuple[np.ndarray, np.ndarray]  # keys (H, d_k), values (H, d_v) of one token (float64)
# a pair and its gates: decay (H,) or (H, d_k), beta (H,), None where the token brought none
Token = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]

# Every rule class by its kind, filled as the classes are defined.
_KINDS: Dict[str, Type["Rule"]] = {}


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in vars(cls):  # a class that names a kind of its own (a subclass of EMA stays unlisted)
            _KINDS.setdefault(cls.kind, cls)

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

    # -- the reference model's hooks (kvfold.reference), each rule's beside its definition ------------

    @property
    def max_slots(self) -> int:
        """The most key/value slots the memory holds (matrix rules: none)."""
        return 0 if self.matrix else 1

    @property
    def averages_pairs(self) -> bool:
        """Whether each slot is an average of folded pairs, so that it has a position (the same average
        of theirs) at which a RoPE rotates its key."""
        return False

    def reference_fold(self, folded: List[Pair]) -> List[Pair]:
        """The memory slots, oldest first, after folding ``folded`` (at least one pair) in order:
        float64 keys (H, d_k) and values (H, d_v). The summary rules' NumPy model."""
        raise TypeError(f"reference: no model of {type(self).__name__}")

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


def from_spec(spec: Tuple[str, Dict[str, np.ndarray], Dict[str, str], Any]) -> Rule:
    """The rule a ``(kind, arrays, options, fn)`` spec describes (as stored in saved state)."""
    kind, arrays, options, _ = spec
    if kind == "custom":
        raise ValueError("rule: a Custom rule cannot be rebuilt from a spec (its function is Python code)")
    if kind not in _KINDS:
        raise ValueError(f"rule: unknown kind {kind!r}")
    return _KINDS[kind]._from_spec(arrays, options)
