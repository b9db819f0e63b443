"""One decode step per rule family, window attention (W 256 and 4096), prefill (T 512 and 2048) and
small shapes, for kvfold and its peers. The result of every timed call is checked."""

import numpy as np
import pytest

import kvfold
from kvfold import rules
from kvfold.tools import bench

# Summary rules no peer implements: kvfold alone, to follow the cost of each fold.
KVFOLD_ONLY = [
    bench.Case("decode Moving(64), window 0", rules.Moving(64)),
    bench.Case("decode Weighted(1,2,3,4), window 0", rules.Weighted((1, 2, 3, 4))),
    bench.Case("decode Compressive(8x4), window 0", rules.Compressive(8, 4)),
    bench.Case("decode W256+S4+Cumulative bf16", rules.Cumulative(), window=256, sinks=4, dtype="bfloat16"),
]
PEERS = {p.name: p for p in bench.peers() if p.available}
THREADS = sorted({1, bench.available_cores()})


def runs():
    """(case, implementation, threads) for everything that runs here; prefill at every thread count."""
    for case in bench.CASES + KVFOLD_ONLY:
        counts = THREADS if case.prefill else [1]
        for threads in counts:
            yield pytest.param(case, "kvfold", threads, id=f"{case.name}-kvfold-{threads}t")
            for name, peer in PEERS.items():
                if peer.supports(case):
                    yield pytest.param(case, name, threads, id=f"{case.name}-{name}-{threads}t")


@pytest.mark.parametrize("case, impl, threads", list(runs()))
def test_time_per_call(benchmark, case, impl, threads):
    data = bench.make_data(case)
    kvfold.set_num_threads(threads)
    if impl == "kvfold":
        run = bench._kvfold_runner(case, data)
    else:
        peer = PEERS[impl]
        peer.set_threads(threads)
        run = bench._peer_runner(peer, case, data, threads)
    benchmark.group = f"{case.name}, {threads} thread(s)"
    benchmark.extra_info["tokens"] = case.tokens
    if case.prefill:
        out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    else:
        out = benchmark(run)
    out = np.asarray(out)
    assert out.shape[-1] == case.head_dim and np.isfinite(out).all()
