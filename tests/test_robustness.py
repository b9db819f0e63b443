"""Hostile use: races, re-entrant calls, shutdown, odd objects, files, aliasing and extreme values.

Each test stands for a way a user broke kvfold once: a crash, a hang or a silently wrong answer must
become a clear error or the right result, and the cache must lose nothing. Whatever could crash or
hang the interpreter runs in a subprocess, so that a regression fails the test instead of pytest.
"""

import os
import pickle
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import kvfold
from kvfold import rules

pytestmark = pytest.mark.one_backend


def run_python(code, timeout=60, env=None):
    """Runs code in a fresh interpreter; returns the finished process (a hang fails the test)."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the subprocess hung for {timeout} s")


def finishes(fn, timeout=20):
    """Runs fn in a daemon thread; returns what it returned or raised (a hang fails the test)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"the call hung for {timeout} s")
    return box


def pairs(B, H, d, T=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (B, H, d) if T is None else (B, H, T, d)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def state(cache):
    return cache.to_bytes()


# ---------------------------------------------------------------------------------------------
# Races: a reorder in one thread while another reads the rule-dependent properties.


@pytest.mark.parametrize("rule", ["rules.Compressive(4, 2)", "rules.Linear()", "rules.GatedDelta(decay=[-0.1, -0.2], beta=0.5)"])
def test_reorder_racing_readers_never_crashes(rule):
    # A switch interval of a microsecond hands the GIL over between almost every two bytecodes, so the
    # readers run while the reorder is inside its C++ work.
    done = run_python(f"""
        import sys, threading, time
        import numpy as np
        import kvfold
        from kvfold import rules
        sys.setswitchinterval(1e-6)
        c = kvfold.MemoryCache({rule}, 2, 4, batch_size=2, window=2)
        k = np.ones((2, 2, 6, 4), np.float32)
        c.update(k, k)
        stop = time.monotonic() + 3
        def reorder():
            while time.monotonic() < stop:
                c.reorder([1, 0])
        t = threading.Thread(target=reorder)
        t.start()
        reads = 0
        while time.monotonic() < stop:
            c.memory_slots; c.matrix_memory; c.memory()
            if reads % 64 == 0:
                c.visible(), c.length, c.nbytes, repr(c)
                if c.matrix_memory:
                    c.load_memory(np.zeros((2, 2, 4, 4), np.float32))
            reads += 1
        t.join()
        print("reads", reads)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("reads ")


# ---------------------------------------------------------------------------------------------
# Re-entrant calls: a Custom rule's fn that calls its own cache, or two caches calling each other.

REENTRANT_CALLS = {
    "length": lambda c: c.length,
    "nbytes": lambda c: c.nbytes,
    "visible_size": lambda c: c.visible_size,
    "visible": lambda c: c.visible(),
    "memory": lambda c: c.memory(),
    "update": lambda c: c.update(*pairs(1, 2, 4)),
    "attend": lambda c: c.attend(np.ones((1, 2, 4), np.float32)),
    "step": lambda c: c.step(np.ones((1, 2, 4), np.float32), *pairs(1, 2, 4)),
    "forward": lambda c: c.forward(np.ones((1, 2, 1, 4), np.float32), *pairs(1, 2, 4, T=1)),
    "to_bytes": lambda c: c.to_bytes(),
    "checkpoint": lambda c: c.checkpoint(),
    "rollback": lambda c: c.rollback(c.checkpoint()),
    "copy": lambda c: c.copy(),
    "select": lambda c: c.select([0]),
    "reorder": lambda c: c.reorder([0]),
    "reset": lambda c: c.reset(),
    "reset rows": lambda c: c.reset([0]),
    "repr": lambda c: repr(c),
    "pickle": lambda c: pickle.dumps(c),
    "concat": lambda c: kvfold.MemoryCache.concat([c, c]),
}


@pytest.mark.parametrize("call", sorted(REENTRANT_CALLS))
def test_a_custom_fn_calling_its_own_cache_raises_instead_of_hanging(call):
    holder = {}

    def fold(mem_k, mem_v, k, v, count):
        REENTRANT_CALLS[call](holder["cache"])
        return mem_k, mem_v

    cache = kvfold.MemoryCache(rules.Custom(fold), 2, 4, window=1)
    holder["cache"] = cache
    cache.update(*pairs(1, 2, 4, seed=1))  # fills the window: nothing folded yet
    before = state_without_custom(cache)
    result = finishes(lambda: cache.update(*pairs(1, 2, 4, seed=2)))
    error = result.get("error")
    assert isinstance(error, RuntimeError), result
    assert "Custom rule's fn" in str(error)
    assert state_without_custom(cache) == before


def state_without_custom(cache):
    """A Custom cache cannot be saved: its length and visible set stand for its state."""
    keys, values, mask = cache.visible()
    return cache.length.tolist(), keys.tobytes(), values.tobytes(), mask.tobytes()


def test_two_custom_caches_calling_each_other_from_two_threads_do_not_deadlock():
    barrier = threading.Barrier(2, timeout=10)
    caches = {}

    def folder(other):
        def fold(mem_k, mem_v, k, v, count):
            barrier.wait()  # both caches are busy folding now
            caches[other].length
            return mem_k, mem_v

        return fold

    caches["a"] = kvfold.MemoryCache(rules.Custom(folder("b")), 2, 4)
    caches["b"] = kvfold.MemoryCache(rules.Custom(folder("a")), 2, 4)
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, finishes(lambda: caches[n].update(*pairs(1, 2, 4)))))
               for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    errors = [r["error"] for r in results.values() if "error" in r]
    assert len(errors) == 1, results  # the thread that would have closed the cycle is refused
    assert isinstance(errors[0], RuntimeError) and "would never end" in str(errors[0])
    refused = next(n for n, r in results.items() if "error" in r)
    assert caches[refused].length.tolist() == [0]  # its update left nothing behind
    assert caches["ab".replace(refused, "")].length.tolist() == [1]


def test_a_custom_fn_may_use_other_caches():
    other = kvfold.MemoryCache(rules.Cumulative(), 2, 4)

    def fold(mem_k, mem_v, k, v, count):
        other.update(k[None], v[None])
        return mem_k + k[:, None], mem_v + v[:, None]

    cache = kvfold.MemoryCache(rules.Custom(fold), 2, 4)
    cache.update(*pairs(1, 2, 4, T=5))
    assert other.length.tolist() == [5]


# ---------------------------------------------------------------------------------------------
# Shutdown: a daemon thread inside kvfold when the interpreter exits.


@pytest.mark.parametrize("work", ["update", "custom"])
def test_a_daemon_thread_inside_kvfold_at_exit_does_not_abort_the_process(work):
    if work == "update":
        setup = "c = kvfold.MemoryCache(rules.Cumulative(), 8, 128, window=4096, batch_size=4)"
    else:
        setup = "c = kvfold.MemoryCache(rules.Custom(lambda mk, mv, k, v, n: (mk + 1, mv)), 8, 128, batch_size=4)"
    for _ in range(3):
        done = run_python(f"""
            import threading, time
            import numpy as np
            import kvfold
            from kvfold import rules
            {setup}
            k = np.ones((4, 8, 256, 128), np.float32)
            started = threading.Event()
            def run():
                while True:
                    started.set()
                    c.update(k, k)
            threading.Thread(target=run, daemon=True).start()
            started.wait()
            time.sleep(0.2)
        """)
        assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# Objects whose __init__ never ran, or ran twice.


def test_a_cache_whose_init_never_ran_raises_type_error_everywhere():
    done = run_python("""
        import numpy as np
        import kvfold
        from kvfold import _core
        c = kvfold.MemoryCache.__new__(kvfold.MemoryCache)
        tried = 0
        for name in ["length", "nbytes", "num_heads", "batch_size", "memory_slots", "matrix_memory", "rule",
                     "visible_size", "scale", "dtype"]:
            try:
                getattr(c, name)
            except TypeError as e:
                assert "never initialized" in str(e), e
                tried += 1
        for call in [lambda: c.update(np.ones((1, 1, 1)), np.ones((1, 1, 1))), lambda: c.attend(np.ones((1, 1, 1))),
                     c.memory, c.visible, c.to_bytes, c.checkpoint, c.reset, c.copy, lambda: c.reorder([0]),
                     lambda: c.select([0]), lambda: repr(c)]:
            try:
                call()
            except TypeError as e:
                assert "never initialized" in str(e), e
                tried += 1
        cp = _core.Checkpoint.__new__(_core.Checkpoint)
        for name in ["length", "nbytes", "batch_size"]:
            try:
                getattr(cp, name)
            except TypeError as e:
                assert "holds no state" in str(e), e
                tried += 1
        print(tried)
    """)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 24


def test_init_again_on_a_live_cache_is_refused_and_changes_nothing():
    cache = kvfold.MemoryCache(rules.EMA(0.5), 2, 4, window=2)
    cache.update(*pairs(1, 2, 4, T=5))
    before = state(cache)
    with pytest.raises(TypeError, match="already initialized"):
        cache.__init__(rules.Cumulative(), 3, 8)
    assert state(cache) == before and cache.rule == rules.EMA(0.5)
