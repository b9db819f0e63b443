"""``python -m kvfold demo``: stream a long synthetic sequence through several memories.

For each memory it prints the bytes the cache holds (constant, however long the stream), the decode
speed in tokens per second (one ``step`` per token, from Python), and the largest difference from
``kvfold.reference`` over the first tokens, relative to the largest output (a linear-attention
memory's outputs grow with the stream, softmax outputs do not).
"""

from __future__ import annotations

import time

import numpy as np

from .. import MemoryCache, reference, rules, simd_backend


def _stream(rng: np.random.Generator, tokens: int, heads: int, query_heads: int, d: int):
    """Keys and values that drift slowly (a topic) plus noise, as real attention inputs do."""
    drift = np.cumsum(rng.normal(scale=0.05, size=(tokens, heads, d)), axis=0)
    k = (drift + rng.normal(size=(tokens, heads, d))).astype(np.float32)
    v = (drift + rng.normal(size=(tokens, heads, d))).astype(np.float32)
    q = rng.normal(size=(tokens, query_heads, d)).astype(np.float32)
    return q, k, v


def run(tokens: int = 20000, check: int = 256, heads: int = 8, head_dim: int = 64) -> int:
    query_heads = heads * 4
    memories = [
        ("window 64 (sliding)", rules.Drop(), 64, 0),
        ("sinks 4 + window 60", rules.Drop(), 60, 4),
        ("cumulative, window 0", rules.Cumulative(), 0, 0),
        ("window 63 + cumulative", rules.Cumulative(), 63, 0),
        ("window 63 + moving(256)", rules.Moving(256), 63, 0),
        ("window 63 + weighted(1,2,3,4)", rules.Weighted((1, 2, 3, 4)), 63, 0),
        ("window 63 + ema(0.05)", rules.EMA(0.05), 63, 0),
        ("window 56 + compressive(8x32)", rules.Compressive(8, 32), 56, 0),
        ("gated linear attention (RetNet)", rules.Gated(decay=np.log(1 - 2.0 ** (-5 - np.arange(heads)))), 0, 0),
        ("window 63 + linear attention", rules.Linear("elu1", normalize=True), 63, 0),
    ]
    rng = np.random.default_rng(0)
    q, k, v = _stream(rng, tokens, heads, query_heads, head_dim)
    print(
        f"kvfold demo: {tokens} tokens, {heads} KV heads, {query_heads} query heads, head_dim {head_dim}, "
        f"kernels: {simd_backend()}"
    )
    print(f"{'memory':32s} {'cache bytes':>12s} {'tokens/s':>10s} {'max rel. diff vs reference':>27s}")
    worst = 0.0
    for name, rule, window, sinks in memories:
        kw = dict(num_heads=heads, head_dim=head_dim, num_query_heads=query_heads, window=window, sinks=sinks)
        cache = MemoryCache(rule, **kw)
        ref = reference.ReferenceCache(rule, **kw)
        before = cache.nbytes
        diff = 0.0
        for t in range(min(check, tokens)):
            out = cache.step(q[None, t], k[None, t], v[None, t])
            want = ref.step(q[None, t], k[None, t], v[None, t])
            diff = max(diff, float(np.abs(out - want).max() / max(1.0, np.abs(want).max())))
        start = time.perf_counter()
        for t in range(min(check, tokens), tokens):
            cache.step(q[None, t], k[None, t], v[None, t])
        rate = (tokens - min(check, tokens)) / max(time.perf_counter() - start, 1e-9)
        assert cache.nbytes == before, "cache grew"
        worst = max(worst, diff)
        print(f"{name:32s} {cache.nbytes:12d} {rate:10.0f} {diff:27.2e}")
    print(
        f"diff: over the first {check} tokens; tokens/s: the rest, one step() call per token. "
        "The cache size never changed."
    )
    return 0 if worst < 1e-4 else 1
