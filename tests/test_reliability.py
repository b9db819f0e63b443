"""Reliability: long streams against float64, threads, and memory that neither leaks nor hides."""

import ctypes
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import kvfold
from kvfold import rules
from rule_cases import SUMMARY

# ---------------------------------------------------------------------------------------------
# Long streams: 10^7 tokens in blocks, checked after every block against a float64 reference.

TOKENS, BLOCK, D = 10**7, 10**6, 4


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(7).standard_normal((BLOCK, D)).astype(np.float32)


def stream(noise):
    """Blocks (start, tokens) whose mean drifts from 1 to 3: a frozen or drifting memory shows."""
    for start in range(0, TOKENS, BLOCK):
        ramp = 1 + 2 * (start + np.arange(BLOCK)) / TOKENS
        yield start, (noise + ramp[:, None]).astype(np.float32)


def long_stream_errors(rule, noise, reference):
    """Largest relative error of the memory slot after each block; reference(tokens so far) -> f64."""
    cache = kvfold.MemoryCache(rule, num_heads=1, head_dim=D)
    worst = 0.0
    for start, x in stream(noise):
        block = x[None, None]
        cache.update(block, block)
        keys, values = cache.memory()
        expected = reference(start, x)
        for got in (keys[0, 0, 0], values[0, 0, 0]):
            worst = max(worst, float(np.max(np.abs(got - expected) / np.abs(expected))))
    assert cache.length[0] == TOKENS
    return worst


def test_cumulative_over_ten_million_tokens(noise):
    total = np.zeros(D)

    def mean_so_far(start, x):
        total[:] += x.sum(axis=0, dtype=np.float64)
        return total / (start + len(x))

    assert long_stream_errors(rules.Cumulative(), noise, mean_so_far) < 1e-5


def test_moving_over_ten_million_tokens(noise):
    n = 1000
    assert long_stream_errors(rules.Moving(n), noise, lambda start, x: x[-n:].astype(np.float64).mean(axis=0)) < 1e-5


def test_weighted_over_ten_million_tokens(noise):
    betas = np.array([0.5, 1.0, 0.25, 2.0, 1.5])

    def weighted(start, x):
        return betas @ x[-len(betas) :].astype(np.float64) / betas.sum()

    assert long_stream_errors(rules.Weighted(tuple(betas)), noise, weighted) < 1e-5


def test_ema_over_ten_million_tokens(noise):
    alpha = 1e-4  # small: a float32 state would be off by about eps / alpha
    # Older tokens weigh less than (1 - alpha)^L < 1e-13 in total, so the last L tokens give the exact
    # EMA to float64 precision (the first token's weight (1 - alpha)^(t-1) is long gone too).
    L = int(np.ceil(np.log(1e-13) / np.log1p(-alpha)))
    weights = alpha * (1 - alpha) ** np.arange(L)[::-1]

    def ema(start, x):
        return weights @ x[-L:].astype(np.float64)

    assert L < BLOCK
    assert long_stream_errors(rules.EMA(alpha), noise, ema) < 1e-5


# ---------------------------------------------------------------------------------------------
# Threads


@pytest.mark.one_backend
def test_many_threads_hammering_one_cache_equal_a_sequential_run():
    """Integer tokens keep the float64 running sum exact, so Cumulative's memory does not depend on
    the order in which the threads' updates land: it must equal a sequential run's, bit for bit."""
    shape = dict(num_heads=2, head_dim=4, value_dim=3, num_query_heads=4, batch_size=2)
    shared = kvfold.MemoryCache(rules.Cumulative(), **shape)
    threads, rounds = 8, 150
    rng = np.random.default_rng(3)
    ks = rng.integers(-8, 9, (threads, rounds, 2, 2, 3, 4)).astype(np.float32)
    vs = rng.integers(-8, 9, (threads, rounds, 2, 2, 3, 3)).astype(np.float32)
    q = rng.standard_normal((2, 4, 4), dtype=np.float32)
    errors = []
    start = threading.Barrier(threads + 1)

    def feeder(i):
        try:
            start.wait()
            for r in range(rounds):
                shared.update(ks[i, r], vs[i, r])
                assert np.isfinite(shared.attend(q)).all()
        except Exception as e:  # pragma: no cover - reported by the assertion below
            errors.append(e)

    def reader():
        """Every snapshot taken meanwhile is whole: it loads, and its row lengths agree."""
        try:
            start.wait()
            scratch = kvfold.MemoryCache(rules.Cumulative(), **shape)
            for _ in range(100):
                copy = kvfold.MemoryCache.from_bytes(shared.to_bytes())
                assert copy.length[0] == copy.length[1] and copy.length[0] % 3 == 0
                scratch.rollback(shared.checkpoint())
                assert scratch.length[0] == scratch.length[1]
                keys, values, mask = shared.visible()
                assert keys.shape[2] == mask.shape[1]
        except Exception as e:  # pragma: no cover
            errors.append(e)

    workers = [threading.Thread(target=feeder, args=(i,)) for i in range(threads - 1)]
    workers.append(threading.Thread(target=reader))
    for w in workers:
        w.start()
    feeder(threads - 1)
    for w in workers:
        w.join()
    assert not errors, errors
    sequential = kvfold.MemoryCache(rules.Cumulative(), **shape)
    for i in range(threads):
        for r in range(rounds):
            sequential.update(ks[i, r], vs[i, r])
    assert shared.to_bytes() == sequential.to_bytes()
    assert shared.length.tolist() == [threads * rounds * 3] * 2


def run_stream(cache, seed, steps=300):
    rng = np.random.default_rng(seed)
    B, H, Hq = cache.batch_size, cache.num_heads, cache.num_query_heads
    outs = []
    for _ in range(steps):
        q = rng.standard_normal((B, Hq, cache.head_dim), dtype=np.float32)
        k = rng.standard_normal((B, H, cache.head_dim), dtype=np.float32)
        v = rng.standard_normal((B, H, cache.value_dim), dtype=np.float32)
        outs.append(cache.step(q, k, v))
    return np.stack(outs)


PARALLEL_RULES = SUMMARY


@pytest.mark.one_backend
def test_several_caches_in_threads_equal_sequential_runs():
    def make(rule):
        return kvfold.MemoryCache(rule, num_heads=2, head_dim=8, num_query_heads=4, batch_size=2, window=6, sinks=1)

    parallel = [make(r) for r in PARALLEL_RULES]
    results = [None] * len(parallel)

    def work(i):
        results[i] = run_stream(parallel[i], seed=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, rule in enumerate(PARALLEL_RULES):
        alone = make(rule)
        np.testing.assert_array_equal(results[i], run_stream(alone, seed=i))
        assert parallel[i].to_bytes() == alone.to_bytes()


@pytest.mark.one_backend
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread states from Linux /proc")
def test_caches_in_threads_compute_at_the_same_moment():
    """Two threads feed their own caches in a loop; this thread looks at them while it holds the GIL.

    kvfold counts the threads inside its C++ work with the GIL released (_threads_without_gil). A
    look counts when that number is 2 before and after reading both workers' /proc syscall state,
    with the GIL held all along (the reads go through ctypes.PyDLL, which keeps it), so neither
    worker can have left and re-entered in between: both were inside kvfold without the GIL. Their
    state then shows whether they computed ("running", or "-1": preempted outside any system call)
    or were blocked in a system call, such as waiting for a lock. No clock is read: if kvfold kept
    the GIL, or serialized caches on a shared lock, no look could ever count."""
    libc = ctypes.PyDLL(None)
    libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
    libc.pread.restype = ctypes.c_ssize_t
    buf = ctypes.create_string_buffer(256)

    def computing(fd):
        n = libc.pread(fd, buf, len(buf), 0)
        return buf.raw[: max(n, 0)].split()[:1] in ([b"running"], [b"-1"])

    caches = [kvfold.MemoryCache(rules.Moving(64), num_heads=8, head_dim=64, window=256) for _ in range(2)]
    block = np.random.default_rng(0).standard_normal((1, 8, 2048, 64), dtype=np.float32)
    ids = [None, None]
    stop = threading.Event()
    ready = threading.Barrier(3)

    def worker(i):
        ids[i] = threading.get_native_id()
        ready.wait()
        while not stop.is_set():
            caches[i].update(block, block)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    ready.wait()
    fds = [os.open(f"/proc/self/task/{tid}/syscall", os.O_RDONLY) for tid in ids]
    looks = both_inside = both_computing = 0
    try:
        while both_computing < 10 and looks < 5000:
            looks += 1
            before = kvfold._core._threads_without_gil()
            states = [computing(fd) for fd in fds]
            if before == 2 and kvfold._core._threads_without_gil() == 2:
                both_inside += 1
                both_computing += all(states)
            stop.wait(0.001)  # hands the GIL to the workers between looks
    finally:
        stop.set()
        for t in threads:
            t.join()
        for fd in fds:
            os.close(fd)
    assert both_computing >= 10, (looks, both_inside, both_computing)
    assert kvfold._core._threads_without_gil() == 0


@pytest.mark.one_backend
def test_reordering_a_cache_that_other_threads_use_never_crashes():
    """A reorder that changes the batch size is refused while another thread's call on the cache is
    under way (its arrays were sized by the old batch); calls sized by the old batch then fail
    cleanly. Every error is a ValueError naming the problem."""
    cache = kvfold.MemoryCache(rules.Compressive(2, 2), num_heads=2, head_dim=8, batch_size=2, window=4)
    rng = np.random.default_rng(5)
    stop = threading.Event()
    errors, unexpected = [], []

    def user():
        while not stop.is_set():
            B = cache.batch_size
            k = rng.standard_normal((B, 2, 16, 8), dtype=np.float32)
            try:
                cache.update(k, k)
                cache.attend(k[:, :, 0])
                cache.visible()
            except ValueError as e:
                errors.append(str(e))
            except Exception as e:  # pragma: no cover
                unexpected.append(e)

    threads = [threading.Thread(target=user) for _ in range(3)]
    for t in threads:
        t.start()
    refused = 0
    try:
        for _ in range(2000):
            try:
                cache.reorder([0, 1, 1] if cache.batch_size == 2 else [0, 2])
            except ValueError as e:
                assert "while another thread is using this cache" in str(e)
                refused += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not unexpected, unexpected
    assert all("expected shape (B=" in e or "k: expected" in e or "q: expected" in e for e in errors), errors[:3]
    assert cache.batch_size in (2, 3)


# ---------------------------------------------------------------------------------------------
# Memory


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.one_backend
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads resident memory from Linux /proc")
def test_resident_memory_is_flat_over_a_million_decode_steps():
    cache = kvfold.MemoryCache(rules.Compressive(4, 2), num_heads=2, head_dim=8, num_query_heads=4, window=16, sinks=2)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 8), dtype=np.float32)
    k = rng.standard_normal((1, 2, 8), dtype=np.float32)
    out = np.empty((1, 4, 8), np.float32)
    scratch = kvfold.MemoryCache(
        rules.Compressive(4, 2), num_heads=2, head_dim=8, num_query_heads=4, window=16, sinks=2
    )

    def run(steps):
        for i in range(steps):
            if i % 2:
                cache.step(q, k, k, out=out)
            else:
                cache.step(q, k, k)  # a new output array each time
            if i % 1000 == 0:  # every other call that allocates, now and then
                scratch.rollback(cache.checkpoint())
                kvfold.MemoryCache.from_bytes(cache.to_bytes())
                cache.select([0, 0]).reorder([1])
                cache.visible()
                cache.memory()

    run(100_000)  # warm up: allocator pools, scratch buffers, NumPy caches
    gc.collect()
    before = resident_bytes()
    run(1_000_000)
    gc.collect()
    grown = resident_bytes() - before
    assert cache.length[0] == 1_100_000
    assert grown < 1 << 20, f"resident memory grew by {grown} bytes over 10^6 steps"  # < 1 byte per step


# Measured in a fresh interpreter, whose allocator has no freed-but-resident memory to hand out
# (that would make a new cache look smaller than it is).
NBYTES_CHILD = textwrap.dedent(
    """
    import gc, json, os
    import kvfold
    from kvfold import rules

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    config = dict(num_heads=8, head_dim=64, num_query_heads=32, window=8192, sinks=4, batch_size=2)
    kvfold.MemoryCache(rules.Moving(2), num_heads=1, head_dim=1).checkpoint()  # one-time set-up costs
    gc.collect()
    r0 = resident()
    cache = kvfold.MemoryCache(rules.Moving(1024), **config)
    r1 = resident()
    cp = cache.checkpoint()
    r2 = resident()
    nbytes, cp_nbytes = cache.nbytes, cp.nbytes
    del cp, cache
    gc.collect()
    r3 = resident()
    print(json.dumps(dict(nbytes=nbytes, cp_nbytes=cp_nbytes, cache=r1 - r0, checkpoint=r2 - r1, freed=r2 - r3)))
    """
)


@pytest.mark.one_backend
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads resident memory from Linux /proc")
def test_nbytes_is_what_the_process_holds():
    """Buffers are zeroed when allocated, so every page they span is resident at once: the resident
    set grows by nbytes, up to the allocator's rounding (each buffer is one aligned allocation, so
    at most a page or two per buffer) and a little for the Python object."""
    child = subprocess.run([sys.executable, "-c", NBYTES_CHILD], capture_output=True, text=True, check=True)
    m = json.loads(child.stdout)
    slack = 16 * os.sysconf("SC_PAGE_SIZE")
    assert m["nbytes"] > 64 * 2**20
    assert abs(m["cache"] - m["nbytes"]) <= slack, m
    assert m["cp_nbytes"] == m["nbytes"] and abs(m["checkpoint"] - m["nbytes"]) <= slack, m  # one copy, no more
    assert m["freed"] >= 2 * m["nbytes"] - 2 * slack, m  # and both are given back
