"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only`` (not collected by the main ``pytest``).

Each benchmark group is one case of ``kvfold.tools.bench``; kvfold and every installed peer that runs the
case are timed side by side on the same data, single-threaded unless the case says otherwise.
"""

import pytest

import kvfold
from kvfold.tools import bench


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Benchmarks run in one process: the test suite's ``-n auto`` would spread them over cores that
    the timings share (and pytest-benchmark turns itself off under xdist)."""
    if hasattr(config.option, "numprocesses"):
        config.option.numprocesses = None
        config.option.dist = "no"


@pytest.fixture(autouse=True)
def one_thread():
    """Single thread unless a benchmark sets another count; restored afterwards."""
    before = kvfold.get_num_threads()
    kvfold.set_num_threads(1)
    for peer in bench.peers():
        if peer.available:
            peer.set_threads(1)
    yield
    kvfold.set_num_threads(before)
