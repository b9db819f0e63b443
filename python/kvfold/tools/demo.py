"""``kvfold demo``: stream a long synthetic sequence through several memories.

For each memory it prints the bytes the cache holds (constant, however long the stream) next to what
a full KV cache of the same stream would hold, the decode speed in tokens per second (one ``step``
per token, from Python), and the largest difference from ``kvfold.reference`` over the first tokens.
``kvfold.reference`` is kvfold's plain NumPy implementation of every rule, written from the formulas:
slow and obviously right, so a small difference says the fast C++ path computes the same thing. The
difference is relative to the largest output (a linear-attention memory's outputs grow with the
stream, softmax outputs do not). The stream is made a block at a time and never held whole.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Iterator, NamedTuple, Tuple

import numpy as np

from .. import MemoryCache, reference, rules, simd_backend

Block = Tuple[np.ndarray, np.ndarray, np.ndarray]  # q (T, query heads, d), k and v (T, heads, d)


class Memory(NamedTuple):
    name: str
    rule: rules.Rule
    window: int = 0
    sinks: int = 0
    retain: str = "fifo"


def _stream(tokens: int, heads: int, query_heads: int, d: int, block: int = 1024, seed: int = 0) -> Iterator[Block]:
    """Keys and values that drift slowly (a topic) plus noise, as real attention inputs do, ``block``
    tokens at a time; the same seed gives the same stream."""
    rng = np.random.default_rng(seed)
    drift = np.zeros((heads, d))
    for start in range(0, tokens, block):
        n = min(block, tokens - start)
        path = drift + np.cumsum(rng.normal(scale=0.05, size=(n, heads, d)), axis=0)
        drift = path[-1]
        k = (path + rng.normal(size=(n, heads, d))).astype(np.float32)
        v = (path + rng.normal(size=(n, heads, d))).astype(np.float32)
        q = rng.normal(size=(n, query_heads, d)).astype(np.float32)
        yield q, k, v


def _size(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1."""
    size, unit = float(nbytes), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def run(tokens: int = 20000, check: int = 256, heads: int = 8, head_dim: int = 64) -> int:
    query_heads = heads * 4
    memories = [
        Memory("window 64 (sliding)", rules.Drop(), 64),
        Memory("sinks 4 + window 60", rules.Drop(), 60, 4),
        Memory("cumulative, window 0", rules.Cumulative()),
        Memory("window 63 + cumulative", rules.Cumulative(), 63),
        Memory("window 63 + moving(256)", rules.Moving(256), 63),
        Memory("window 63 + weighted(1,2,3,4)", rules.Weighted((1, 2, 3, 4)), 63),
        Memory("window 63 + ema(0.05)", rules.EMA(0.05), 63),
        Memory("window 56 + compressive(8x32)", rules.Compressive(8, 32), 56),
        Memory("gated linear attention (RetNet)", rules.Gated(decay=np.log(1 - 2.0 ** (-5 - np.arange(heads))))),
        Memory("window 63 + linear attention", rules.Linear("elu1", normalize=True), 63),
        Memory("sinks 4 + window 52 + merge(8)", rules.Merge(8), 52, 4),
        Memory("TOVA window 56 + merge(8)", rules.Merge(8), 56, retain="tova"),
    ]
    check = min(check, tokens)
    full = tokens * heads * head_dim * 2 * 4  # float32 keys and values of every token
    print(
        f"kvfold demo: {tokens} tokens, {heads} KV heads, {query_heads} query heads, head_dim {head_dim}, "
        f"kernels: {simd_backend()}"
    )
    print(f"a full float32 KV cache of these {tokens} tokens would hold {full:,} bytes ({_size(full)}) and grow")
    print(f"{'memory':32s} {'cache bytes':>12s} {'tokens/s':>10s} {'max rel. diff vs reference':>27s}")
    worst = 0.0
    for name, rule, window, sinks, retain in memories:
        cache = MemoryCache(
            rule, heads, head_dim, num_query_heads=query_heads, window=window, sinks=sinks, retain=retain
        )
        # ReferenceCache recomputes each step from the whole history; which pairs attention-chosen retention
        # keeps depends on every step's weights, which StreamCache models step by step.
        model = reference.ReferenceCache if retain == "fifo" else partial(reference.StreamCache, retain=retain)
        ref = model(rule, heads, head_dim, num_query_heads=query_heads, window=window, sinks=sinks)
        before = cache.nbytes
        diff, seconds, t = 0.0, 0.0, 0
        for q, k, v in _stream(tokens, heads, query_heads, head_dim):
            for i in range(len(q)):
                if t < check:
                    out = cache.step(q[None, i], k[None, i], v[None, i])
                    want = ref.step(q[None, i], k[None, i], v[None, i])
                    diff = max(diff, float(np.abs(out - want).max() / max(1.0, np.abs(want).max())))
                else:
                    start = time.perf_counter()
                    cache.step(q[None, i], k[None, i], v[None, i])
                    seconds += time.perf_counter() - start
                t += 1
        rate = f"{(tokens - check) / seconds:10.0f}" if seconds > 0 else f"{'-':>10s}"
        if cache.nbytes != before:
            raise AssertionError(f"{name}: the cache grew from {before} to {cache.nbytes} bytes")
        worst = max(worst, diff)
        print(f"{name:32s} {cache.nbytes:12,d} {rate} {diff:27.2e}")
    print(
        f"diff: the largest difference from kvfold.reference (kvfold's NumPy implementation written from the "
        f"formulas) over the first {check} tokens, relative to the largest output; tokens/s: the other "
        f"{tokens - check} tokens, one step() call each. No cache grew."
    )
    return 0 if worst < 1e-4 else 1
