"""Update rules: how an evicted key/value pair is folded into the fixed-size memory.

``Mem = Update(S_kv, Mem_pre)``. Each rule is a small frozen dataclass; its parameters are checked by
the C++ core when the rule is made, so a bad rule fails before any cache exists. Index ``i`` counts
the pairs folded so far in a row (0-based); ``kv`` stands for the key and the value vector, each
updated the same way.

Summary rules (Drop, Cumulative, Moving, Weighted, EMA, Compressive, Merge, GRU, Custom) hold key/value
slots that softmax attention reads like any other pair. Matrix rules (Linear, Gated, Delta,
GatedDelta: the linear-attention family, as ONNX LinearAttention defines it) hold S (d_k x d_v) per
head and are read linearly.

Each rule is one class, in ``summary.py`` or ``matrix.py``, with its NumPy reference model beside it
(``reference_fold``, or ``reference_step`` and ``reference_read`` for a matrix rule), and one file in the
C++ core (``cpp/src/rules/``) under the same ``kind``.
"""

from __future__ import annotations

from typing import Dict, Type

from . import matrix, summary
from ._base import _KINDS, Rule, from_spec
from .matrix import *  # noqa: F403  (its __all__: the matrix rules)
from .summary import *  # noqa: F403  (its __all__: the summary rules)

# Each rule module's __all__ lists its rules, so a new rule is exported from where it is defined.
__all__ = ["Rule", "from_spec", "kinds"]
__all__ += summary.__all__
__all__ += matrix.__all__


def kinds() -> Dict[str, Type[Rule]]:
    """Every rule class by its ``kind``, in the order they are defined: the one list the command line
    and the reference model take their rules from."""
    return dict(_KINDS)
