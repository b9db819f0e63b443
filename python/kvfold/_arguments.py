"""The arguments a cache is made with, declared once: their order, defaults and type checks.

``kvfold.MemoryCache`` takes ``CacheArguments``; the reference models take the groups they model
(``reference.Layout``: ``WithRope``, ``reference.StreamCache``: ``WithRetention``). Each constructor is an
``__init__(self, *args, **kwargs)`` marked ``@parameters_of(...)``, so that help(), ``inspect.signature`` and type
checkers see the parameters listed here. What a value means (ranges, shapes, defaults filled in from other
arguments) is each cache's own check.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import rules
from ._checks import integer
from .rope import RoPE

if TYPE_CHECKING:
    from typing_extensions import Concatenate, ParamSpec

    P = ParamSpec("P")


def parameters_of(arguments: Callable[P, Any]) -> Callable[[Callable[..., None]], Callable[Concatenate[Any, P], None]]:
    """Mark an ``__init__(self, *args, **kwargs)`` as taking the parameters of ``arguments``."""

    def mark(init: Callable[..., None]) -> Any:
        self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        parameters = [self, *inspect.signature(arguments).parameters.values()]
        init.__signature__ = inspect.Signature(parameters, return_annotation="None")  # type: ignore[attr-defined]
        return init

    return mark


@dataclass(frozen=True)
class Shape:
    """What every cache takes: the rule and the sizes."""

    rule: Optional[rules.Rule]
    num_heads: int
    head_dim: int
    value_dim: Optional[int] = None
    num_query_heads: Optional[int] = None
    batch_size: int = 1
    window: int = 0
    sinks: int = 0
    scale: Optional[float] = None

    def __post_init__(self) -> None:
        if self.rule is not None and not isinstance(self.rule, rules.Rule):
            raise TypeError(
                f"rule: expected a kvfold.rules rule (e.g. rules.Cumulative()), got {type(self.rule).__name__}"
            )
        for name in ("num_heads", "head_dim", "value_dim", "num_query_heads", "batch_size", "window", "sinks"):
            value = getattr(self, name)
            if value is not None or name not in ("value_dim", "num_query_heads"):
                object.__setattr__(self, name, integer(name, value))
        scale = self.scale
        if scale is None:
            return
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__} {scale!r}")
        if not float(scale) > 0:
            raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")


@dataclass(frozen=True)
class WithStorage(Shape):
    """How the pairs are stored."""

    dtype: str = "float32"
    check_finite: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype is None:
            raise TypeError("dtype: expected 'float32', 'float16', 'bfloat16' or 'int8', got None")
        if not isinstance(self.dtype, str):  # a NumPy or Python type: its name
            object.__setattr__(self, "dtype", str(getattr(self.dtype, "__name__", self.dtype)))
        if not isinstance(self.check_finite, bool):
            raise TypeError(f"check_finite: expected True or False, got {type(self.check_finite).__name__}")


@dataclass(frozen=True)
class WithRope(Shape):
    """The keys' rotation by position."""

    rope: Optional[RoPE] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rope is not None and not isinstance(self.rope, RoPE):
            raise TypeError(f"rope: expected a kvfold.RoPE or None, got {type(self.rope).__name__}")


@dataclass(frozen=True)
class WithRetention(WithRope):
    """Which window pair is folded."""

    retain: str = "fifo"
    recent: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.retain, str):
            raise TypeError(f"retain: expected 'fifo', 'tova' or 'h2o', got {type(self.retain).__name__}")
        if self.recent is not None:
            object.__setattr__(self, "recent", integer("recent", self.recent))


@dataclass(frozen=True)
class CacheArguments(WithRetention, WithStorage):
    """``kvfold.MemoryCache``'s: every group, storage before rope and retention (fields follow the
    reversed method resolution order: Shape, WithStorage, WithRope, WithRetention)."""
