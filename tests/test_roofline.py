"""The roofline beside the benchmark: its byte and FLOP formulas, its measuring loops, its column."""

import math

import numpy as np
import pytest

import kvfold
from kvfold import _core, rules
from kvfold.__main__ import main
from kvfold.tools import bench, roofline

pytestmark = pytest.mark.one_backend

HD = 32 * 128  # heads x head_dim of the benchmark's cases


def case(name):
    return next(c for c in bench.CASES if c.name == name)


def test_window_decode_reads_its_rows_once():
    # 4 sinks + 256 window rows + the slot, keys and values in float32; q, k, v; float64 sums.
    w = roofline.step_work(case("decode W256+S4+Cumulative"))
    assert w.bytes == HD * (12 + 2 * 4 * 261 + 2 * 8)
    assert w.flops == 4 * HD * 261
    half = roofline.step_work(case("decode W256+S4+Cumulative f16"))
    assert half.bytes == HD * (12 + 2 * 2 * 261 + 2 * 8) and half.flops == w.flops


def test_long_window_without_a_slot():
    w = roofline.step_work(case("decode W4096+S4 (Drop)"))
    assert w.bytes == HD * (12 + 2 * 4 * 4100) and w.footprint == HD * 2 * 4 * 4100


def test_matrix_prefill_counts_the_recurrent_multiply_adds():
    # Linear: 2 d^2 multiply-adds per token and head; GatedDelta 3; S read once per prefill.
    linear = roofline.step_work(case("prefill T2048 Linear"))
    assert linear.flops == 2 * 2 * 32 * 128**2
    assert math.isclose(linear.bytes, 12 * HD + 4 * 32 * 128**2 / 2048)
    assert roofline.step_work(case("prefill T2048 GatedDelta")).flops == 2 * 3 * 32 * 128**2


def test_summary_prefill_averages_the_rows_each_token_sees():
    # window 2, no sinks, 4 tokens: they see 1, 2, 2 + slot and 2 + slot rows.
    w = roofline.step_work(bench.Case("p", rules.Cumulative(), window=2, tokens=4, heads=1, head_dim=8))
    assert w.flops == 4 * 8 * (1 + 2 + 3 + 3) / 4


def test_rules_without_a_model_have_no_bound():
    assert roofline.step_work(bench.Case("moving", rules.Moving(8))) is None
    with pytest.raises(ValueError, match="rule: expected drop, .* got 'moving'"):
        _core._step_work("moving", 1, 8, 0, 0, 4, 1)
    with pytest.raises(ValueError, match="element_bytes: expected 1, 2 or 4, got 3"):
        _core._step_work("drop", 1, 8, 0, 0, 3, 1)
    with pytest.raises(ValueError, match="heads: expected an integer >= 1, got 0"):
        _core._step_work("drop", 0, 8, 0, 0, 4, 1)


@pytest.mark.parametrize("backend", kvfold.available_backends())
def test_fma_peak_is_a_plausible_rate(backend):
    peak = _core._fma_peak(backend, 0.02)
    assert math.isfinite(peak) and 1e7 < peak < 1e13  # FLOP/s of one core


def test_read_loop_reads_whole_blocks_at_least_8_mb_a_call():
    loop = _core._ReadLoop(1000)
    assert (loop.bytes, loop.passes) == (1024, 8192)  # blocks of 8 512-bit vectors
    large = _core._ReadLoop(3 << 20)
    assert (large.bytes, large.passes) == (3 << 20, 2)
    loop.read()
    with pytest.raises(ValueError, match=r"bytes: expected a buffer size in \[64, 2\^36\], got 63"):
        _core._ReadLoop(63)


def test_measuring_refuses_bad_arguments():
    with pytest.raises(ValueError, match="backend: expected one this machine runs .* got 'vax'"):
        _core._fma_peak("vax", 0.01)
    with pytest.raises(ValueError, match=r"bytes: expected a buffer size in \[64, 2\^36\], got 10"):
        _core._ReadLoop(10)
    with pytest.raises(ValueError, match=r"seconds: expected a duration in \(0, 60\]"):
        _core._fma_peak(kvfold.simd_backend(), 0.0)


def test_bound_is_the_longer_of_reading_and_computing():
    roof = roofline.Roofline(seconds=0.01)
    for c in (case("decode W256+S4+Cumulative"), case("prefill T512 GatedDelta")):
        b = roof.bound(c, bandwidth=50e9)
        w = b.work
        reading, computing = w.bytes / 50e9, w.flops / roof.peaks[kvfold.simd_backend()]
        assert b.seconds == max(reading, computing) and b.memory == (reading >= computing)
        assert b.fraction(2 * b.seconds) == 0.5
    assert roof.bound(bench.Case("moving", rules.Moving(4)), bandwidth=50e9) is None


def test_bound_takes_the_bandwidth_measured_beside_the_case():
    roof = roofline.Roofline(seconds=0.01)
    c = case("decode W256+S4+Cumulative")
    w = roofline.step_work(c)
    b = roof.bound(c, bandwidth=1e9)
    assert b.memory and b.rate == 1e9 and b.seconds == w.bytes / 1e9
    assert roof.bound(c, bandwidth=1e15).memory is False  # a bandwidth no core has: the FMA peak bounds it
    reads = roof.reader(c)
    assert reads.bytes >= w.footprint and reads.bytes - w.footprint < 1024
    assert roof.reader(bench.Case("moving", rules.Moving(4))) is None


def test_step_overhead_checks_like_step_and_changes_nothing():
    cache = kvfold.MemoryCache(rules.EMA(0.5), num_heads=2, head_dim=8)
    x = np.ones((1, 2, 8), np.float32)
    out = cache._step_overhead(x, x, x)
    assert out.shape == (1, 2, 8) and out.dtype == np.float32
    assert cache.length.tolist() == [0]
    with pytest.raises(ValueError, match="k: expected"):
        cache._step_overhead(x, x[:, :1], x)


def test_bench_table_has_the_bound_column(capsys):
    assert main(["bench", "--quick", "--threads", "1", "--cases", "decode EMA, window 0"]) == 0
    out = capsys.readouterr().out
    assert "FMA peak of one core:" in out
    header = next(line for line in out.splitlines() if line.startswith("threads: 1"))
    assert header.split()[3:5] == ["of", "bound"]
    row = next(line for line in out.splitlines() if line.startswith("decode EMA, window 0"))
    assert row.split()[5].endswith("%") and row.split()[6] == "mem"
    assert any(line.startswith("call overhead of step, H32 d128") for line in out.splitlines())
    assert "  decode EMA, window 0: " in out and "bound" in out
