"""Threads: the thread count is validated, and results never depend on it."""

import threading

import numpy as np
import pytest

import kvfold
from conftest import make_cache
from kvfold import rules


@pytest.fixture(autouse=True)
def restore_threads():
    before = kvfold.get_num_threads()
    yield
    kvfold.set_num_threads(before)


@pytest.fixture
def share_everything():
    """Every call with more than one lane goes through the pool, however small."""
    before = kvfold._core._set_min_shared_flops(0)
    yield
    kvfold._core._set_min_shared_flops(before)


@pytest.mark.one_backend
def test_thread_count_is_set_and_read():
    assert kvfold.get_num_threads() >= 1
    for n in (1, 2, 3, kvfold._core.MAX_THREADS):
        kvfold.set_num_threads(n)
        assert kvfold.get_num_threads() == n


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "value, error, words",
    [
        (0, ValueError, ["num_threads", "[1, 1024]", "got 0"]),
        (-2, ValueError, ["num_threads", "got -2"]),
        (1025, ValueError, ["num_threads", "got 1025"]),
        (2**70, ValueError, ["num_threads", str(2**70)]),
        (1.5, TypeError, ["num_threads", "integer", "float"]),
        (True, TypeError, ["num_threads", "bool"]),
        ("2", TypeError, ["num_threads", "str"]),
    ],
)
def test_bad_thread_counts_are_refused(value, error, words):
    kvfold.set_num_threads(2)
    with pytest.raises(error) as info:
        kvfold.set_num_threads(value)
    for w in words:
        assert w in str(info.value)
    assert kvfold.get_num_threads() == 2


# (rule, shape as in conftest.SHAPES, other keywords)
CONFIGS = [
    (rules.Cumulative(), (2, 8, 16, 64, 64, 80, 2), {}),
    (rules.EMA(0.2), (3, 4, 4, 96, 96, 0, 0), {}),
    (rules.Drop(), (1, 6, 24, 64, 64, 200, 4), {"dtype": "float16"}),
    (rules.Gated(decay=np.full((4, 32), -0.05)), (2, 4, 8, 32, 32, 16, 2), {}),
    (
        rules.GRU(*np.random.default_rng(3).uniform(-0.1, 0.1, (2, 96, 32)).astype(np.float32)),
        (3, 4, 8, 16, 16, 5, 1),
        {},
    ),
    (
        rules.GRU(*np.random.default_rng(4).uniform(-0.1, 0.1, (2, 3, 96, 32)).astype(np.float32)),
        (2, 3, 3, 16, 16, 0, 0),
        {},
    ),
]


def run_everything(cfg, seed):
    """update, attend, step and forward on one cache; every output and the final state."""
    rule, shape, keywords = cfg
    cache = make_cache(rule, shape, **keywords)
    rng = np.random.default_rng(seed)
    B, H, Hq, d = cache.batch_size, cache.num_heads, cache.num_query_heads, cache.head_dim
    outs = []
    cache.update(
        rng.standard_normal((B, H, 120, d), dtype=np.float32), rng.standard_normal((B, H, 120, d), dtype=np.float32)
    )
    outs.append(cache.attend(rng.standard_normal((B, Hq, d), dtype=np.float32)))
    for _ in range(3):
        outs.append(
            cache.step(
                rng.standard_normal((B, Hq, d), dtype=np.float32),
                rng.standard_normal((B, H, d), dtype=np.float32),
                rng.standard_normal((B, H, d), dtype=np.float32),
            )
        )
    outs.append(
        cache.forward(
            rng.standard_normal((B, Hq, 40, d), dtype=np.float32),
            rng.standard_normal((B, H, 40, d), dtype=np.float32),
            rng.standard_normal((B, H, 40, d), dtype=np.float32),
        )
    )
    return outs, cache.to_bytes()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: repr(c[0]))
def test_results_do_not_depend_on_the_thread_count(cfg, share_everything):
    kvfold.set_num_threads(1)
    want_outs, want_state = run_everything(cfg, seed=5)
    for n in (2, 3, 8):
        kvfold.set_num_threads(n)
        outs, state = run_everything(cfg, seed=5)
        for a, b in zip(outs, want_outs):
            np.testing.assert_array_equal(a, b)
        assert state == want_state


@pytest.mark.one_backend
def test_caches_in_several_threads_share_the_pool(share_everything):
    """Callers from several threads at once: one uses the pool, the others run on their own thread;
    each result is still exactly the single-threaded one."""
    kvfold.set_num_threads(1)
    want = [run_everything(CONFIGS[0], seed=s) for s in range(3)]
    kvfold.set_num_threads(2)
    got = [None] * 3
    errors = []

    def work(i):
        try:
            got[i] = run_everything(CONFIGS[0], seed=i)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (outs, state), (want_outs, want_state) in zip(got, want):
        for a, b in zip(outs, want_outs):
            np.testing.assert_array_equal(a, b)
        assert state == want_state


@pytest.mark.one_backend
@pytest.mark.parametrize("where", [0, 65536 * 3 + 7, -1])
def test_threads_share_the_finite_check_and_find_every_nan(where, share_everything):
    """A long block is checked in pieces on several threads: a NaN in any piece is found, named by
    its index, and the cache is left as it was."""
    kvfold.set_num_threads(3)
    cache = kvfold.MemoryCache(rules.Cumulative(), num_heads=2, head_dim=64, window=4)
    k = np.ones((1, 2, 2000, 64), np.float32)  # 256000 values: four pieces
    before = cache.to_bytes()
    k.reshape(-1)[where] = np.nan
    index = np.unravel_index(where % k.size, k.shape)
    with pytest.raises(ValueError, match=r"k: expected finite values, got NaN at \[b=%d, h=%d, t=%d, d_k=%d\]" % index):
        cache.update(k, np.ones_like(k))
    assert cache.to_bytes() == before
    k.reshape(-1)[where] = 1.0
    cache.update(k, np.ones_like(k))  # and a clean block passes
    assert cache.length.tolist() == [2000]
