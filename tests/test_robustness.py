"""Hostile use: races, re-entrant calls, shutdown, odd objects, files, aliasing and extreme values.

Each test stands for a way a user broke kvfold once: a crash, a hang or a silently wrong answer must
become a clear error or the right result, and the cache must lose nothing. Whatever could crash or
hang the interpreter runs in a subprocess, so that a regression fails the test instead of pytest.
"""

import os
import pickle
import threading

import numpy as np
import pytest

import kvfold
from kvfold import rules
from robustness_helpers import finishes, pairs, run_python, state
from rule_cases import every_rule

pytestmark = pytest.mark.one_backend


# ---------------------------------------------------------------------------------------------
# Races: a reorder in one thread while another reads the rule-dependent properties.


@pytest.mark.parametrize(
    "rule", ["rules.Compressive(4, 2)", "rules.Linear()", "rules.GatedDelta(decay=[-0.1, -0.2], beta=0.5)"]
)
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
            caches[other].length  # noqa: B018 (the read is the point: it waits for the other cache)
            return mem_k, mem_v

        return fold

    caches["a"] = kvfold.MemoryCache(rules.Custom(folder("b")), 2, 4)
    caches["b"] = kvfold.MemoryCache(rules.Custom(folder("a")), 2, 4)
    results = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, finishes(lambda: caches[n].update(*pairs(1, 2, 4)))))
        for n in "ab"
    ]
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


# ---------------------------------------------------------------------------------------------
# Files: kvfold.load checks what it opens before it reads; save takes any name and writes through
# symbolic links.


def test_load_of_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "state.kvf"
    os.mkfifo(fifo)
    result = finishes(lambda: kvfold.load(fifo), timeout=10)
    assert isinstance(result.get("error"), ValueError) and "regular file" in str(result["error"])


def test_load_reads_the_header_before_the_rest(tmp_path):
    junk = tmp_path / "junk.bin"
    with open(junk, "wb") as f:  # 2 GiB, sparse: only the first bytes are written
        f.write(b"NOTKVFLD" + bytes(16))
        f.truncate(2 << 30)
    cache = kvfold.MemoryCache(rules.EMA(0.5), 2, 4)
    cache.update(*pairs(1, 2, 4, T=3))
    padded = tmp_path / "padded.kvf"
    padded.write_bytes(cache.to_bytes() + bytes(10))
    # Under a 1 GiB address-space limit, reading either file whole would fail with MemoryError.
    done = run_python(f"""
        import resource
        import kvfold
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        for path, words in [({str(junk)!r}, "wrong magic"), ({str(padded)!r}, "header declares")]:
            try:
                kvfold.load(path)
            except ValueError as e:
                assert words in str(e), e
            else:
                raise AssertionError("loaded " + path)
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_save_takes_the_longest_file_names(tmp_path):
    cache = kvfold.MemoryCache(rules.Cumulative(), 2, 4)
    cache.update(*pairs(1, 2, 4, T=3))
    path = tmp_path / ("c" * 243)
    cache.save(path)
    assert kvfold.load(path).to_bytes() == cache.to_bytes()
    assert os.listdir(tmp_path) == [path.name]


def test_save_through_a_symbolic_link_writes_the_file_it_points_to(tmp_path):
    target, link = tmp_path / "real.kvf", tmp_path / "link.kvf"
    target.write_bytes(b"old")
    link.symlink_to(target)
    cache = kvfold.MemoryCache(rules.Cumulative(), 2, 4)
    cache.update(*pairs(1, 2, 4, T=3))
    cache.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == cache.to_bytes()
    assert sorted(os.listdir(tmp_path)) == ["link.kvf", "real.kvf"]


# ---------------------------------------------------------------------------------------------
# out= that is also an input.

ALIAS_RULES = [rules.Drop(), rules.Cumulative(), rules.Linear(), rules.GatedDelta(decay=[-0.1, -0.2], beta=0.5)]


@pytest.mark.parametrize("rule", ALIAS_RULES, ids=repr)
@pytest.mark.parametrize("layout", [dict(window=3, sinks=1), dict()])
def test_out_may_be_an_input(rule, layout):
    def make():
        c = kvfold.MemoryCache(rule, 2, 4, **layout)
        c.update(*pairs(1, 2, 4, T=6, seed=3))
        return c

    q, k, v = np.random.default_rng(5).standard_normal((3, 1, 2, 4)).astype(np.float32)
    want = make().attend(q)
    got = q.copy()
    assert make().attend(got, out=got) is got
    np.testing.assert_array_equal(got, want)

    want = make().step(q, k, v)
    for alias in "qkv":
        inputs = {"q": q.copy(), "k": k.copy(), "v": v.copy()}
        out = inputs[alias]
        make().step(inputs["q"], inputs["k"], inputs["v"], out=out)
        np.testing.assert_array_equal(out, want, err_msg=f"out={alias}")

    half = q.copy()  # out overlapping half of q: a view one head further on
    both = np.concatenate([half, half], axis=1)
    view = both[:, 1:3]
    expected = make().attend(np.ascontiguousarray(both[:, 0:2]))
    make().attend(both[:, 0:2], out=view)
    np.testing.assert_array_equal(view, expected)


# ---------------------------------------------------------------------------------------------
# A Custom rule whose fn returns NaN: refused, and the cache unchanged.


def test_a_custom_fn_that_returns_nan_is_refused_and_changes_nothing():
    def fold(mem_k, mem_v, k, v, count):
        mem_k = mem_k + k[:, None]
        if count == 2:
            mem_k[1, 0, 3] = np.nan
        return mem_k, mem_v

    cache = kvfold.MemoryCache(rules.Custom(fold), 2, 4)
    cache.update(*pairs(1, 2, 4, T=2))
    before = state_without_custom(cache)
    with pytest.raises(ValueError, match="Custom rule: fn's new_mem_k must hold finite values, got NaN"):
        cache.update(*pairs(1, 2, 4))
    assert state_without_custom(cache) == before
    lenient = kvfold.MemoryCache(rules.Custom(fold), 2, 4, check_finite=False)
    lenient.update(*pairs(1, 2, 4, T=3))
    assert np.isnan(lenient.memory()[0]).any()


# ---------------------------------------------------------------------------------------------
# Stress: every mutating method against every reader, on every kind of rule, from several threads.
# Under ThreadSanitizer (.ci/run builds the module with -fsanitize=thread) this is the race check.

D = 4
# every rule whose gates, if any, are fixed (the operations pass none)
STRESS_RULES = [r for r in every_rule(D, D) if not r.per_token_gates] + [
    rules.Custom(lambda mk, mv, k, v, n: (0.5 * (mk + k[:, None]), mv))
]


def stress_operations(cache, rng):
    q = rng.standard_normal((2, 4, D)).astype(np.float32)
    k, v = pairs(2, 2, D, seed=int(rng.integers(1 << 30)))
    kb, vb = pairs(2, 2, D, T=5, seed=int(rng.integers(1 << 30)))
    qb = rng.standard_normal((2, 4, 5, D)).astype(np.float32)
    cp = cache.checkpoint()
    mutations = [
        lambda: cache.update(k, v),
        lambda: cache.update(kb, vb),
        lambda: cache.step(q, k, v),
        lambda: cache.forward(qb, kb, vb),
        lambda: cache.reset(),
        lambda: cache.reset([1]),
        lambda: cache.reorder([1, 0]),
        lambda: cache.rollback(cp),
        lambda: cache.rollback(cp, rows=[0]),
        lambda: cache.attend(q, out=np.empty((2, 4, D), np.float32)),
    ]
    if cache.matrix_memory:
        z = [np.zeros((2, 2, D), np.float32)] if getattr(cache.rule, "normalize", False) else []
        mutations.append(lambda: cache.load_memory(np.zeros((2, 2, D, D), np.float32), *z))
    savable = cache.rule.kind != "custom"
    readers = [
        lambda: cache.length,
        lambda: cache.nbytes,
        lambda: cache.visible_size,
        lambda: cache.memory_slots,
        lambda: cache.matrix_memory,
        lambda: cache.visible(),
        lambda: cache.memory(),
        lambda: cache.attend(q),
        lambda: cache.copy(),
        lambda: cache.checkpoint(),
        lambda: cache.select([1, 1]),
        lambda: repr(cache),
        lambda: kvfold.MemoryCache.concat([cache, cache]),
        lambda: kvfold.MemoryCache.from_bytes(cache.to_bytes()) if savable else None,
    ]
    return mutations, readers


@pytest.mark.parametrize("rule", STRESS_RULES, ids=lambda r: r.kind)
def test_stress_every_mutation_against_every_reader(rule):
    cache = kvfold.MemoryCache(rule, 2, D, num_query_heads=4, batch_size=2, window=3, sinks=1)
    cache.update(*pairs(2, 2, D, T=6))
    errors, rounds = [], 200
    start = threading.Barrier(4)

    def worker(seed, mutating):
        rng = np.random.default_rng(seed)
        mutations, readers = stress_operations(cache, rng)
        ops = mutations if mutating else readers
        try:
            start.wait()
            for _ in range(rounds):
                result = ops[rng.integers(len(ops))]()
                if isinstance(result, np.ndarray) and result.dtype == np.float32:
                    assert np.isfinite(result).all()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, i < 2)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    # Nothing was corrupted: after a reset the stressed cache computes what a fresh one does.
    fresh = kvfold.MemoryCache(rule, 2, D, num_query_heads=4, batch_size=2, window=3, sinks=1)
    cache.reset()
    rng = np.random.default_rng(9)
    qb = rng.standard_normal((2, 4, 7, D)).astype(np.float32)
    kb, vb = pairs(2, 2, D, T=7, seed=9)
    np.testing.assert_array_equal(cache.forward(qb, kb, vb), fresh.forward(qb, kb, vb))
