"""The roofline beside the benchmark's times: how close each case comes to what one core can do.

In the same run as the cases, kvfold measures one core's limits: the FMA peak of each SIMD backend
(independent chains of fused multiply-adds in its vectors) and the read bandwidth at each case's
working-set size (a buffer of that size read again and again: L2-, L3- and DRAM-sized sets read at
very different rates). The benchmark reads that buffer in rounds between the case's own, so that on
a machine shared with other work the bound and the time come from the same conditions. A case's
bytes and FLOPs per step come from one set of formulas in the C++ core (``cpp/src/roofline.cpp``,
``step_work``): a decode step reads the visible keys and values (a matrix memory reads S), a prefill
token does the attention's or the matrix rule's multiply-adds. The bound is the longer of bytes /
bandwidth and FLOPs / peak; the fraction printed is bound / measured time, so 100% means the case
runs at the machine's limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import _core, available_backends, simd_backend

# Rules whose bytes and FLOPs the formulas know.
MODELED = ("drop", "cumulative", "ema", "linear", "gated", "delta", "gated_delta")


@dataclass(frozen=True)
class Work:
    """What one step asks for: a decode step, or one token of a prefill."""

    bytes: float  # read, at least once each (the writes go to lines just read, or are small)
    flops: float  # useful floating-point operations (a multiply-add counts 2)
    footprint: float  # distinct bytes the reads come from: the working set whose read rate bounds the step


def step_work(case: Any) -> Optional[Work]:
    """The ``Work`` of a benchmark case (``kvfold.tools.bench.Case``), or None for a rule the
    formulas do not model."""
    kind = case.rule.kind
    if kind not in MODELED:
        return None
    element_bytes = {"float32": 4, "int8": 1}.get(case.dtype, 2)
    b, f, footprint = _core._step_work(
        kind, case.heads, case.head_dim, case.window, case.sinks, element_bytes, max(case.tokens, 1)
    )
    return Work(b, f, footprint)


@dataclass(frozen=True)
class Bound:
    """A case's least time per step on one core, and what sets it."""

    work: Work
    seconds: float
    memory: bool  # bound by the read bandwidth (else by the FMA peak)
    rate: float  # that bandwidth in bytes/s, or that peak in FLOP/s

    def fraction(self, seconds: float) -> float:
        """The share of the bound a measured time per step reaches (1.0: at the bound)."""
        return self.seconds / seconds

    def describe(self) -> str:
        w = self.work
        limit = f"read {self.rate * 1e-9:.1f} GB/s" if self.memory else f"FMA {self.rate * 1e-9:.1f} GFLOP/s"
        return (
            f"{w.bytes / 1e6:.3g} MB, {w.flops / 1e6:.3g} MFLOP per step; working set {w.footprint / 1e6:.3g} MB;"
            f" bound {self.seconds * 1e6:.3g} us by {limit}"
        )


class Roofline:
    """One core's FMA peak for every backend this machine runs, measured when made (``seconds`` each),
    and the bounds of cases whose read bandwidth the benchmark measures beside them (``reader``)."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.peaks: Dict[str, float] = {name: _core._fma_peak(name, seconds) for name in available_backends()}

    @staticmethod
    def reader(case: Any) -> Optional[_core._ReadLoop]:
        """A buffer of the case's working-set size whose ``read()`` the benchmark times beside the
        case (``bytes * passes`` over the seconds of a read are the bandwidth for ``bound``), or None
        for a rule the formulas do not model."""
        work = step_work(case)
        return None if work is None else _core._ReadLoop(max(64, int(work.footprint)))

    def bound(self, case: Any, bandwidth: float) -> Optional[Bound]:
        """The case's bound with the active backend's peak and ``bandwidth``, the bytes/s read at the
        case's working set beside it, or None for a rule the formulas do not model."""
        work = step_work(case)
        if work is None:
            return None
        peak = self.peaks[simd_backend()]
        memory = work.bytes / bandwidth >= work.flops / peak
        return Bound(
            work, work.bytes / bandwidth if memory else work.flops / peak, memory, bandwidth if memory else peak
        )

    def describe(self) -> str:
        return "FMA peak of one core: " + ", ".join(f"{n} {p * 1e-9:.1f}" for n, p in self.peaks.items()) + " GFLOP/s"


def cell(bound: Optional[Bound], seconds: float) -> str:
    """The table's "of bound" column: e.g. ``" 54% mem"`` or ``" 71% fma"``; ``-`` without a bound."""
    if bound is None:
        return f" {'-':>8s}"
    return f" {bound.fraction(seconds):4.0%} {'mem' if bound.memory else 'fma'}"


def report(bounds: Sequence[Tuple[str, Optional[Bound]]]) -> List[str]:
    """Lines under the table: each case's bytes, FLOPs, working set and bound."""
    return [f"  {name}: {b.describe()}" for name, b in bounds if b is not None]
