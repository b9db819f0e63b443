"""What attention reads in the reference model: positions, their rotation (RoPE), softmax, and the layout
(heads, dimensions, batch, sinks, window, scale) both reference caches share."""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

from .. import rules
from .._arguments import WithRope, parameters_of
from ..rope import RoPE
from .memory import check_rope

RETAIN = ("fifo", "tova", "h2o")


def rotate(rope: RoPE, x: np.ndarray, positions: Any) -> np.ndarray:
    """``x`` (..., d) rotated by ``rope`` at ``positions`` (broadcast against x's leading dimensions),
    float64: pair i (dimensions i and i + D/2 for layout "half", 2i and 2i + 1 for "interleaved", D the
    rotated dimensions) turns by angle ``p * theta ** (-2 i / D)``, or ``p * rope.frequencies[i]`` when the RoPE
    has its own; ``rotate(rope, rotate(rope, x, p), -p) == x``."""
    x = np.asarray(x, np.float64)
    D = rope.rotated_dims(x.shape[-1])
    half = D // 2
    if rope.frequencies is None:
        frequencies = rope.theta ** (-2.0 * np.arange(half) / D)
    else:
        frequencies = np.asarray(rope.frequencies, np.float64)
    angle = np.asarray(positions, np.float64)[..., None] * frequencies
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = (slice(0, half), slice(half, D)) if rope.layout == "half" else (slice(0, D, 2), slice(1, D, 2))
    out = x.copy()
    out[..., a] = x[..., a] * cos - x[..., b] * sin
    out[..., b] = x[..., b] * cos + x[..., a] * sin
    return out


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


class Layout:
    """The arguments of ``kvfold.MemoryCache`` that shape a cache, checked and filled in as it does."""

    @parameters_of(WithRope)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._configure(WithRope(*args, **kwargs))

    def _configure(self, a: WithRope) -> None:
        self.rule = rules.Drop() if a.rule is None else a.rule
        self.num_heads, self.head_dim = a.num_heads, a.head_dim
        self.value_dim = a.head_dim if a.value_dim is None else a.value_dim
        self.num_query_heads = a.num_heads if a.num_query_heads is None else a.num_query_heads
        self.batch_size, self.window, self.sinks = a.batch_size, a.window, a.sinks
        self.scale = 1.0 / np.sqrt(a.head_dim) if a.scale is None else a.scale
        check_rope(self.rule, a.rope, a.head_dim)
        self.rope = a.rope
        self.reset()

    def reset(self, rows: Optional[List[int]] = None) -> None:
        """Rows (all of them when None) start again empty."""
        raise NotImplementedError
