"""kvfold: fixed-size attention memory for CPUs.

A transformer's KV cache grows with every token. ``kvfold.MemoryCache`` keeps it at a fixed size:
the first ``sinks`` pairs are kept exactly, the last ``window`` pairs too, and every pair pushed out
of the window is folded into a small memory by an update rule, ``Mem = Update(S_kv, Mem_pre)``.
Queries attend over ``[sinks | memory | window]``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Optional, Type

import numpy.typing as npt

from . import _core, _state, rules
from ._arguments import CacheArguments, parameters_of
from ._checks import integer
from ._core import available_backends, simd_backend
from ._state import Checkpoint
from .rope import RoPE

__version__: str = _core.__version__

if os.environ.get("KVFOLD_SIMD") and os.environ["KVFOLD_SIMD"] not in _core._known_backends():
    warnings.warn(
        f"KVFOLD_SIMD: expected one of {', '.join(_core._known_backends())}, got {os.environ['KVFOLD_SIMD']!r}; "
        f"using {simd_backend()}",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "MemoryCache",
    "RoPE",
    "Checkpoint",
    "load",
    "rules",
    "reference",
    "simd_backend",
    "available_backends",
    "set_num_threads",
    "get_num_threads",
    "set_chunk_size",
    "get_chunk_size",
    "__version__",
]


def set_num_threads(num_threads: int) -> None:
    """Threads a call may use, the calling thread included; default: the cores this process may use.

    Work splits over (batch row x KV head) when there is enough of it; results are identical
    whatever the count. One thread never pays for the pool.
    """
    _core.set_num_threads(integer("num_threads", num_threads, 1, _core.MAX_THREADS))


def get_num_threads() -> int:
    """Threads a call may use, the calling thread included."""
    return _core.get_num_threads()


def set_chunk_size(chunk_size: int) -> None:
    """Tokens per chunk when a matrix rule (``Linear``, ``Gated``, ``Delta``, ``GatedDelta``) takes a
    block in ``forward`` or ``update``; default 32.

    A block's folds into the matrix memory run a chunk at a time as small matrix products (the
    chunked form of linear attention, with the WY form for the delta rules). The chunk size tunes
    speed only: results change by float rounding at most.
    """
    _core.set_chunk_size(integer("chunk_size", chunk_size, 1, _core.MAX_CHUNK))


def get_chunk_size() -> int:
    """Tokens per chunk when a matrix rule takes a block."""
    return _core.get_chunk_size()


class MemoryCache(_core.MemoryCache):
    """A fixed-size attention memory for ``batch_size`` rows of ``num_heads`` KV heads.

    Per row and KV head, token t's pair (k_t, v_t) becomes a sink while fewer than ``sinks`` pairs
    were seen, else enters the window (the last ``window`` pairs, FIFO); a pair pushed out of the
    window (every non-sink pair when ``window=0``) is folded into the memory by ``rule``.
    ``attend(q)`` is softmax attention of each query head over ``[sinks | memory slots | window]``
    of its KV head (query head h reads KV head ``h // (num_query_heads // num_heads)``). Matrix
    rules (``rules.Linear``, ``Gated``, ``Delta``, ``GatedDelta``) keep S (d_k x d_v) per KV head
    instead of slots and read it linearly, mixed with softmax attention over ``[sinks | window]``
    when there are any; their per-token gates are the ``decay=`` and ``beta=`` keywords of
    ``update``, ``step`` and ``forward``.

    ``rope`` (a ``kvfold.RoPE``): the keys come rotated by their positions (the ``positions=`` of
    ``update``, ``step`` and ``forward``; default: the tokens each row has seen). Each pair is folded
    un-rotated, and a memory slot's key is read rotated at the slot's position, the same average of
    the folded positions as its key is of the folded keys (``Sp / n`` for ``rules.Merge``). It takes the
    rules whose slots average pairs (``rule.averages_pairs``; not GRU, Custom, Compressive(pool="max")
    nor the matrix rules).

    ``retain``: which pair of the full window and the new one is folded. ``"fifo"`` (default): the
    oldest. ``"tova"``: the one the latest ``attend`` weighed least (its softmax weight averaged over the
    query heads of the KV head, sinks and slots in the softmax; pairs not attended yet are kept first,
    the oldest among equals). ``"h2o"``: the lowest sum of weights over every ``attend``, never one of
    the ``recent`` newest (default ``window // 2``). Summary rules only (not the matrix rules nor Custom).
    ``kvfold.reference.StreamCache`` is the model both follow.

    ``dtype`` ("float32", "float16", "bfloat16", "int8") is how sinks, window and memory slots are stored (GRU
    and Custom slots, being their state, and matrix memories stay float32); compute is float32. "int8" is
    llama.cpp's q8_0: every 32 values share a float32 scale (max |x| / 127); scores multiply the int8 keys
    by the query quantized the same way, accumulating in float32.
    Inputs of any real dtype and layout are converted; NaN/Inf is rejected unless ``check_finite=False``.
    Bad input raises ValueError or TypeError and leaves the cache as it was.

    State: ``to_bytes``/``from_bytes`` and ``save``/``kvfold.load`` persist it (a versioned binary
    format with a CRC32), ``checkpoint``/``rollback`` snapshot and restore it, ``reorder``,
    ``select`` and ``concat`` rearrange, split and join batch rows.
    """

    @parameters_of(CacheArguments)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "_rule" in self.__dict__:
            raise TypeError(
                "MemoryCache: this cache is already initialized; make a new cache instead of calling __init__ again"
            )
        a = CacheArguments(*args, **kwargs)
        rule = rules.Drop() if a.rule is None else a.rule
        super().__init__(
            rule._spec(),
            batch_size=a.batch_size,
            num_heads=a.num_heads,
            head_dim=a.head_dim,
            value_dim=a.head_dim if a.value_dim is None else a.value_dim,
            num_query_heads=a.num_heads if a.num_query_heads is None else a.num_query_heads,
            window=a.window,
            sinks=a.sinks,
            scale=0.0 if a.scale is None else float(a.scale),
            dtype=a.dtype,
            check_finite=a.check_finite,
            rope=None if a.rope is None else (a.rope.theta, a.rope.dim or 0, a.rope.layout, a.rope.frequencies or ()),
            retain=a.retain,
            recent=-1 if a.recent is None else a.recent,
        )
        self._rule = rule

    @property
    def rule(self) -> rules.Rule:
        """The update rule that folds evicted pairs into the memory."""
        rule: Optional[rules.Rule] = self.__dict__.get("_rule")
        if rule is None:
            raise TypeError("MemoryCache: this object was never initialized; make caches with kvfold.MemoryCache(...)")
        return rule

    @property
    def rope(self) -> Optional[RoPE]:
        """The cache's ``kvfold.RoPE``, or None."""
        r = self._rope
        return None if r is None else RoPE(r[0], r[1] or None, r[2], r[3] or None)

    def copy(self) -> "MemoryCache":
        """An independent deep copy (configuration and state)."""
        new = type(self).__new__(type(self))
        _core.MemoryCache.__init__(new, self)
        new._rule = self._rule
        return new

    __copy__ = copy

    def __deepcopy__(self, memo: Any) -> "MemoryCache":
        return self.copy()

    @classmethod
    def from_bytes(cls, data: bytes) -> "MemoryCache":
        """A cache from ``to_bytes()`` output; ValueError on truncated, corrupt or foreign data."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expected bytes, got {type(data).__name__}")
        new = cls.__new__(cls)
        _core.MemoryCache.__init__(new, bytes(data))
        try:
            new._rule = rules.from_spec(new._rule_spec)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data: invalid kvfold state: its rule cannot be rebuilt: {e}") from None
        return new

    def __reduce__(self) -> Any:
        return (_restore, (type(self), self.to_bytes()))

    def save(self, path: _state.PathLike) -> None:
        """Write ``to_bytes()`` to ``path`` atomically: ``path`` ends up holding either its previous
        content or the whole new state, never a part of it, even on a crash or a full disk."""
        _state.write_atomically(path, self.to_bytes())

    # Checkpoints and batch operations -------------------------------------------------------

    # These two take and give the Python Checkpoint, which wraps the core one with its rule.
    def checkpoint(self) -> Checkpoint:  # type: ignore[override]
        """An immutable snapshot of the state, for ``rollback``. Costs one copy of the state."""
        return Checkpoint._wrap(super().checkpoint(), self._rule)

    def rollback(self, checkpoint: Checkpoint, rows: Optional[npt.ArrayLike] = None) -> None:  # type: ignore[override]
        """Restore ``checkpoint`` bit-exactly: every row, or only ``rows``. The checkpoint may come
        from this cache or from any cache of the same configuration; ValueError otherwise."""
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError(
                f"checkpoint: expected a kvfold.Checkpoint from cache.checkpoint(), got {type(checkpoint).__name__}"
            )
        if checkpoint.rule != self._rule:
            raise ValueError(
                f"checkpoint: taken from a cache with rule={checkpoint.rule!r}, this cache has rule={self._rule!r}"
            )
        super().rollback(checkpoint._state, rows)

    def select(self, rows: npt.ArrayLike) -> "MemoryCache":
        """A new cache of the given rows, in that order (rows may repeat)."""
        new = type(self).__new__(type(self))
        _core.MemoryCache.__init__(new, self, rows)
        new._rule = self._rule
        return new

    @classmethod
    def concat(cls, caches: Iterable["MemoryCache"]) -> "MemoryCache":
        """A new cache holding the rows of every cache in order. The caches must have the same
        configuration except for ``batch_size``."""
        if isinstance(caches, (str, bytes, _core.MemoryCache)) or not hasattr(caches, "__iter__"):
            raise TypeError(f"caches: expected a sequence of kvfold.MemoryCache, got {type(caches).__name__}")
        caches = list(caches)
        for i, c in enumerate(caches):
            if not isinstance(c, MemoryCache):
                raise TypeError(f"caches[{i}]: expected a kvfold.MemoryCache, got {type(c).__name__}")
            if c.rule != caches[0].rule:
                raise ValueError(f"caches[{i}]: expected rule={caches[0].rule!r} like caches[0], got rule={c.rule!r}")
        new = cls.__new__(cls)
        _core.MemoryCache.__init__(new, caches)
        new._rule = caches[0].rule
        return new

    def _options(self) -> str:
        """The non-default rope= and retain= settings, as repr shows them."""
        text = "" if self.rope is None else f"rope={self.rope!r}, "
        if self.retain != "fifo":
            text += f"retain={self.retain!r}, " + (f"recent={self.recent}, " if self.retain == "h2o" else "")
        return text

    def __repr__(self) -> str:
        lengths = self.length.tolist()
        shown = lengths if len(lengths) <= 8 else lengths[:8] + ["..."]
        return (
            f"MemoryCache(rule={self.rule!r}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"value_dim={self.value_dim}, num_query_heads={self.num_query_heads}, batch_size={self.batch_size}, "
            f"window={self.window}, sinks={self.sinks}, scale={self.scale:.6g}, dtype={self.dtype!r}, "
            f"check_finite={self.check_finite}, {self._options()}length={shown}, nbytes={self.nbytes})"
        )


def _restore(cls: Type[MemoryCache], data: bytes) -> MemoryCache:
    return cls.from_bytes(data)


def load(path: _state.PathLike) -> MemoryCache:
    """The cache ``cache.save(path)`` wrote; ValueError if the file is not a valid kvfold state."""
    return MemoryCache.from_bytes(_state.read_file(path))


from . import reference  # noqa: E402  (reference imports rules and rope only; kept last for a flat namespace)
