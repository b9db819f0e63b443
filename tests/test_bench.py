"""The benchmark's peers compute what kvfold computes, and ``python -m kvfold bench`` prints its table."""

import io
from dataclasses import replace

import numpy as np
import pytest

from kvfold import rules
from kvfold.__main__ import main
from kvfold.tools import bench
from kvfold.tools.bench import ggml_peer

PEERS = [p for p in bench.peers() if p.available]
SMALL = [
    bench.Case("ema", rules.EMA(0.3), heads=2, head_dim=8),
    bench.Case("cumulative", rules.Cumulative(), window=5, sinks=1, heads=3, head_dim=16),
    bench.Case("drop", rules.Drop(), window=7, sinks=2, heads=2, head_dim=8),
    bench.Case("linear", rules.Linear(), heads=2, head_dim=8),
    bench.Case("gated delta", rules.GatedDelta(), heads=3, head_dim=16, gates=True),
]
MATRIX = [c for c in SMALL if c.matrix] + [
    bench.Case("gated", rules.Gated(), heads=2, head_dim=8, gates=True),
    bench.Case("delta", rules.Delta(), heads=2, head_dim=8, gates=True),
]


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_peers_agree_with_kvfold(peer, case):
    if not peer.supports(case):  # ONNX Runtime's attention, torch.cat and ggml windows need a window
        assert (
            (peer.name.startswith("onnxruntime") and not case.matrix)
            or (peer.name == "torch-cat" and (case.matrix or case.window == 0))
            or (peer.name == "ggml" and not isinstance(case.rule, rules.Drop))
        )
        return
    assert bench._agreement(case, peer, threads=1) < 1e-5


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.name)
@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_matrix_peers_prefill_like_kvfold(peer, case):
    """The peers' own prefill (chunked, or ONNX Runtime's operator over all tokens): 150 tokens,
    two chunks of 64 and a part of one."""
    case = replace(case, tokens=150)
    if peer.name in ("torch-cat", "ggml"):  # ways of writing windows, not matrix memories
        assert not peer.supports(case)
        return
    assert peer.supports(case)
    assert bench._prefill_agreement(case, peer, threads=1) < 1e-5


def test_peers_fill_from_empty_like_kvfold():
    """Prefill runs peers from an empty memory: partly filled windows and sinks must agree too."""
    case = bench.Case("fill", rules.Cumulative(), window=4, sinks=2, heads=2, head_dim=8)
    data = bench.make_data(case, seed=3)
    for peer in PEERS:
        if peer.name.startswith("onnxruntime") or peer.name == "ggml":  # they attend over full buffers only
            continue
        theirs, ours = peer.memory(case, 1), bench.KvfoldMemory(case)
        for t in range(3):  # visible rows: 1, 2 sinks, then a window row; no memory yet
            a = ours.step(data["q"][0] + t, data["k"][0] - t, data["v"][0] * t)
            b = theirs.step(*(peer.convert(x) for x in (data["q"][0] + t, data["k"][0] - t, data["v"][0] * t)))
            assert np.abs(a - np.asarray(b)).max() < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_ggml_peer_stores_the_cases_dtype(dtype):
    """llama.cpp's cache in float16, bfloat16 or q8_0 against kvfold's in the same type: both round
    the pairs alike (ggml also rounds the query and, for float16, its running sums)."""
    ggml = next((p for p in PEERS if p.name == "ggml"), None)
    if ggml is None:
        pytest.skip("ggml-python is not installed")
    import ggml as lib

    case = bench.Case("drop", rules.Drop(), window=40, sinks=2, heads=2, head_dim=64, dtype=dtype)
    exact = bench._agreements(replace(case, dtype="float32"), [ggml], threads=1)["ggml"]
    rounded = bench._agreements(case, [ggml], threads=1)["ggml"]
    assert exact < 1e-5 and rounded < 2e-2
    memory = ggml.memory(case, 1)  # the tensor lives as long as its memory
    stored = memory.k_cache.contents.type
    assert stored == getattr(lib, ggml_peer.GGML_TYPES[dtype]) != lib.GGML_TYPE_F32


@pytest.mark.one_backend
def test_bench_command_prints_a_table(capsys):
    assert main(["bench", "--quick", "--threads", "1", "--cases", "tiny decode EMA"]) == 0
    out = capsys.readouterr().out
    assert "SIMD kernels:" in out and "cores" in out
    row = next(line for line in out.splitlines() if line.startswith("tiny decode EMA"))
    case = next(c for c in bench.CASES if c.name.startswith("tiny decode EMA"))
    # window 0: NumPy and PyTorch run it, ONNX Runtime's attention and torch-cat need a window
    runs = {"numpy", "torch"} & {p.name for p in PEERS}
    assert row.count("x)") == sum(p.supports(case) for p in PEERS) == len(runs)


@pytest.mark.one_backend
@pytest.mark.parametrize("args", [["--threads", "0"], ["--cases", "no such case"]])
def test_bench_command_refuses_bad_arguments(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick", *args])
    assert info.value.code == 2
    assert args[0] in capsys.readouterr().err


@pytest.mark.one_backend
def test_bench_command_shows_progress_on_stderr(capsys):
    assert main(["bench", "--quick", "--cases", "tiny decode EMA"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("[1/1] tiny decode EMA H1 d8, 1 thread: ")
    assert "[1/1]" not in captured.out


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.one_backend
def test_status_rewrites_one_line_on_a_terminal():
    stream = Terminal()
    status = bench.Status(stream)
    status("case 1: numpy round 1/5")
    status("case 1: torch")
    status.clear()
    first, second = "case 1: numpy round 1/5", "case 1: torch"
    assert stream.getvalue() == f"\r{first}\r{second.ljust(len(first))}\r{' ' * len(second)}\r"


@pytest.mark.one_backend
def test_status_writes_a_log_a_line_at_a_time_and_seldom():
    stream = io.StringIO()
    status = bench.Status(stream, every=3600)
    status("first")
    status("second")  # within the hour: not written
    status.clear()
    assert stream.getvalue() == "first\n"


@pytest.mark.one_backend
def test_a_round_starts_after_an_untimed_call(monkeypatch):
    """The runner before a round leaves its own data in the caches: each runner's first call after
    another's (here 1 s on a fake clock, the others 1 ms) is not timed."""
    from kvfold.tools.bench import timing

    clock, last = [0.0], [""]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def runner(name):
        def run():
            clock[0] += 1.0 if last[0] != name else 1e-3
            last[0] = name

        return run

    times = timing.time_per_token({"a": runner("a"), "b": runner("b")}, tokens=1, rounds=3, round_seconds=0.04)
    assert times == {"a": pytest.approx(1e-3), "b": pytest.approx(1e-3)}
