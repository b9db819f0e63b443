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

from ..rules._base import Pair, Token
from ..rules.matrix import feature_map
from ..rules.summary import MergeSlots, cosine_matrix
from .attention import RETAIN, Layout, check_positions, rotate, softmax_attend, softmax_weights
from .history import ReferenceCache
from .memory import (
    MATRIX_RULES,
    Slot,
    check_rope,
    fold_memory,
    gru_cell,
    matrix_fold,
    matrix_read,
    max_slots,
    memory_slots,
    merge_slots,
)
from .stream import StreamCache

__all__ = [
    "MATRIX_RULES",
    "RETAIN",
    "Layout",
    "MergeSlots",
    "Pair",
    "ReferenceCache",
    "Slot",
    "StreamCache",
    "Token",
    "check_positions",
    "check_rope",
    "cosine_matrix",
    "feature_map",
    "fold_memory",
    "gru_cell",
    "matrix_fold",
    "matrix_read",
    "max_slots",
    "memory_slots",
    "merge_slots",
    "rotate",
    "softmax_attend",
    "softmax_weights",
]
