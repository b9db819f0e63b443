"""Timing the cases, checking the peers against kvfold, and the table."""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from ... import __version__, get_num_threads, set_num_threads, simd_backend
from .. import roofline
from .cases import CASES, Case, feed, fill_tokens, make_data, repeat_first, split_gates
from .peers import Peer, peers
from .summary_peers import KvfoldMemory

# ---------------------------------------------------------------------------------------------
# Timing


def _kvfold_runner(case: Case, data: Dict[str, np.ndarray]) -> Callable[[], Any]:
    """kvfold called as a user would: (B, H, d) or (B, H, T, d) arrays in, a new array out."""
    tokens, gates = split_gates(data)
    if case.prefill:
        q, k, v = (np.ascontiguousarray(tokens[name].transpose(1, 0, 2))[None] for name in ("q", "k", "v"))
        block_gates = {n: np.ascontiguousarray(g.T)[None] for n, g in gates.items()}
        return lambda: KvfoldMemory(case).cache.forward(q, k, v, **block_gates)
    memory = KvfoldMemory(case)
    feed(memory, repeat_first(data, fill_tokens(case)))
    q, k, v = (tokens[name][0][None] for name in ("q", "k", "v"))
    step_gates = {n: g[0][None] for n, g in gates.items()}
    return lambda: memory.cache.step(q, k, v, **step_gates)


def _call_overhead_runner(case: Case, data: Dict[str, np.ndarray]) -> Callable[[], Any]:
    """A decode step's call from Python without the step: the same checks, conversions, output array
    and GIL release around no work. A decode time minus this is the time in the C++ core."""
    memory = KvfoldMemory(case)
    tokens, gates = split_gates(data)
    q, k, v = (tokens[name][0][None] for name in ("q", "k", "v"))
    step_gates = {n: g[0][None] for n, g in gates.items()}
    return lambda: memory.cache._step_overhead(q, k, v, **step_gates)


def _peer_runner(peer: Peer, case: Case, data: Dict[str, np.ndarray], threads: int) -> Callable[[], Any]:
    """A peer's decode step, or its prefill from an empty memory: its forward when it has one, else
    a loop of decode steps."""
    tokens, gates = split_gates({n: peer.convert(x) for n, x in data.items()})
    q, k, v = tokens["q"], tokens["k"], tokens["v"]
    if case.prefill:

        def prefill() -> Any:
            memory = peer.memory(replace(case, tokens=1), threads)
            if hasattr(memory, "forward"):
                return memory.forward(q, k, v, **gates)
            for t in range(case.tokens):
                out = memory.step(q[t], k[t], v[t], **{n: g[t] for n, g in gates.items()})
            return out

        return prefill
    memory = peer.memory(replace(case, tokens=1), threads)
    feed(memory, repeat_first(data, fill_tokens(case)), peer.convert)
    first = {n: g[0] for n, g in gates.items()}
    q0, k0, v0 = q[0], k[0], v[0]
    return lambda: memory.step(q0, k0, v0, **first)


def _agreements(case: Case, peers: Sequence[Peer], threads: int, steps: int = 4) -> Dict[str, float]:
    """Largest difference between kvfold's and each peer's outputs over a few decode steps, once
    sinks, window and memory are full."""
    fill = fill_tokens(case)
    data = make_data(replace(case, tokens=fill + steps), seed=1)

    def outputs(memory: Any, convert: Callable[[np.ndarray], Any]) -> np.ndarray:
        feed(memory, {n: x[:fill] for n, x in data.items()}, convert)
        out = []
        for t in range(fill, fill + steps):
            tokens, gates = split_gates({n: convert(x[t]) for n, x in data.items()})
            # a copy: some peers return a view of a buffer the next step overwrites
            out.append(np.asarray(memory.step(tokens["q"], tokens["k"], tokens["v"], **gates)).copy())
        return np.stack(out)

    ours = outputs(KvfoldMemory(case), lambda x: x)
    return {
        p.name: float(np.abs(ours - outputs(p.memory(replace(case, tokens=1), threads), p.convert)).max())
        for p in peers
    }


def _agreement(case: Case, peer: Peer, threads: int, steps: int = 4) -> float:
    """Largest difference between kvfold's and the peer's outputs over a few decode steps."""
    return _agreements(case, [peer], threads, steps)[peer.name]


def _prefill_agreement(case: Case, peer: Peer, threads: int) -> float:
    """Largest difference between kvfold's and the peer's prefill outputs, relative to the largest output."""
    data = make_data(case, seed=1)
    ours = np.asarray(_kvfold_runner(case, data)())[0].transpose(1, 0, 2)
    theirs = np.asarray(_peer_runner(peer, case, data, threads)())
    if not hasattr(peer.memory(replace(case, tokens=1), threads), "forward"):
        ours = ours[-1]  # a loop of steps returns the last step's output
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


# The runner that reads a buffer of the case's working set beside the implementations (see run).
READ = "read bandwidth"


def time_per_token(
    runners: Dict[str, Callable[[], Any]],
    tokens: int,
    rounds: int = 5,
    round_seconds: float = 0.15,
    settle_seconds: float = 0.0,
    warmup_calls: int = 2,
    progress: Callable[[str], None] = lambda text: None,
) -> Dict[str, float]:
    """Seconds per token of each runner: the best of `rounds` rounds that take the runners in turn.
    Each runner first runs `warmup_calls` times (more if they take less than a quarter of
    `round_seconds`), which sizes its rounds to about `round_seconds`. With several runners, a round
    starts after one untimed call: the runner before it has left its own data in the caches. With
    several threads, each runner's turn starts `settle_seconds` after the previous one ends: thread
    pools (OpenBLAS, OpenMP, ONNX Runtime) keep spinning for a while after their work and would
    otherwise take cores from whichever runner comes next. `progress` hears what runs next."""
    calls = {}
    for name, run in runners.items():
        progress(f"{name} warm-up")
        start, n = time.perf_counter(), 0
        while n < warmup_calls or (time.perf_counter() - start < round_seconds / 4 and n < 100_000):
            run()
            n += 1
        calls[name] = max(1, int(n * round_seconds / 4 / max(time.perf_counter() - start, 1e-9)))
    best = {name: float("inf") for name in runners}
    for r in range(rounds):
        for name, run in runners.items():
            progress(f"{name} round {r + 1}/{rounds}")
            time.sleep(settle_seconds)
            if len(runners) > 1:
                run()
            start = time.perf_counter()
            for _ in range(calls[name]):
                run()
            best[name] = min(best[name], (time.perf_counter() - start) / calls[name] / tokens)
    return best


class Status:
    """What the benchmark is doing, on one line of stderr: rewritten in place on a terminal; elsewhere
    (a log) a line at most every few seconds, so that long cases show progress without flooding it."""

    def __init__(self, stream: Optional[TextIO] = None, every: float = 5.0) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.every, self.last, self.width = every, -float("inf"), 0

    def __call__(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        elif time.monotonic() - self.last >= self.every:
            self.stream.write(text + "\n")
            self.last = time.monotonic()
        else:
            return
        self.stream.flush()

    def clear(self) -> None:
        """Clears the line (on a terminal) before the table prints under it."""
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


# ---------------------------------------------------------------------------------------------
# The table


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {available_cores()} cores"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _report_in(report: Callable[[str], None], where: str, text: str) -> None:
    report(f"{where} {text}")


def run(
    cases: Sequence[Case] = tuple(CASES),
    threads: Sequence[int] = (),
    rounds: int = 5,
    round_seconds: float = 0.15,
    print_fn: Callable[[str], None] = print,
    quick: bool = False,
    status: Optional[Status] = None,
) -> List[Dict[str, Any]]:
    """Times every case for kvfold and each installed peer; prints tables; returns the rows.

    ``quick``: one warm-up call per implementation instead of two, and the outputs checked on at most
    4 heads. ``status`` (a ``Status``, default none) reports progress inside each case."""
    threads = list(threads) or sorted({1, available_cores()})
    found = [p for p in peers() if p.available]
    before = get_num_threads()
    report = status if status is not None else (lambda text: None)
    print_fn(f"kvfold {__version__} bench on {machine()}; SIMD kernels: {simd_backend()}")
    print_fn(
        "peers: "
        + ", ".join(f"{p.name} {p.version}" for p in found)
        + "; B=1, query heads = KV heads, d_k = d_v, float32 unless marked f16 or bf16 (kvfold's storage)"
    )
    print_fn("times in microseconds per token; (N.Nx) = peer time / kvfold time; - = peer does not run this case")
    roof = roofline.Roofline(seconds=0.05 if quick else 0.2)
    print_fn(
        f"of bound = the case's bound on one core / kvfold's time (1 thread; mem: bytes / read bandwidth at its "
        f"working set, fma: FLOPs / FMA peak); {roof.describe()}"
    )
    rows: List[Dict[str, Any]] = []
    bounds: List[Tuple[str, Optional[roofline.Bound]]] = []
    try:
        for n in threads:
            set_num_threads(n)
            for p in found:
                p.set_threads(n)
            header = f"{'threads: ' + str(n):38s} {'kvfold':>9s} {'of bound':>8s}" + "".join(
                f" {p.name:>20s}" for p in found
            )
            print_fn("")
            print_fn(header)
            for i, case in enumerate(cases):
                where = f"[{i + 1}/{len(cases)}] {case.name}, {n} thread{'s' if n > 1 else ''}:"
                report(f"{where} data and kvfold setup")
                data = make_data(case)
                runners = {"kvfold": _kvfold_runner(case, data)}
                for p in found:
                    if p.supports(case):
                        report(f"{where} {p.name} setup")
                        runners[p.name] = _peer_runner(p, case, data, n)
                # The bound's read bandwidth (one core's): reads of a buffer of the case's working set, in
                # rounds between the implementations' rounds.
                reads = roof.reader(case) if n == 1 else None
                if reads is not None:
                    runners[READ] = reads.read
                times = time_per_token(
                    runners,
                    case.tokens,
                    rounds,
                    round_seconds,
                    settle_seconds=0.1 if n > 1 else 0.0,
                    warmup_calls=1 if quick else 2,
                    progress=functools.partial(_report_in, report, where),
                )
                bound = None
                if reads is not None:  # time_per_token divides each runner's time by the tokens: a read is one call
                    bound = roof.bound(case, reads.bytes * reads.passes / (times.pop(READ) * case.tokens))
                row = {"case": case.name, "threads": n, "us": {k: t * 1e6 for k, t in times.items()}}
                if n == 1:  # the bounds are one core's
                    bounds.append((case.name, bound))
                    if bound is not None:
                        row["of_bound"] = bound.fraction(times["kvfold"])
                cells = f"{case.name:38s} {times['kvfold'] * 1e6:9.2f}{roofline.cell(bound, times['kvfold'])}"
                for p in found:
                    if p.name in times:
                        cells += f" {times[p.name] * 1e6:11.1f} ({times[p.name] / times['kvfold']:5.1f}x)"
                    else:
                        cells += f" {'-':>20s}"
                if status is not None:
                    status.clear()
                print_fn(cells)
                rows.append(row)
            decode = [c for c in cases if not c.prefill and c.heads == CASES[0].heads]
            if decode:  # the Python call alone, as its own line: what a decode step costs before any work
                name = f"call overhead of step, H{decode[0].heads} d{decode[0].head_dim}"
                report(f"{name}, {n} thread{'s' if n > 1 else ''}")
                runner = {"kvfold": _call_overhead_runner(decode[0], make_data(decode[0]))}
                seconds = time_per_token(runner, 1, rounds, round_seconds, warmup_calls=1 if quick else 2)["kvfold"]
                if status is not None:
                    status.clear()
                print_fn(f"{name:38s} {seconds * 1e6:9.2f} {'-':>8s}")
                rows.append({"case": name, "threads": n, "us": {"kvfold": seconds * 1e6}})
        if any(b is not None for _, b in bounds):
            print_fn("")
            print_fn("bounds on one core (measured in this run):")
            for line in roofline.report(bounds):
                print_fn(line)
        print_fn("")
        for case in cases:
            if case.prefill:
                continue
            checked = replace(case, heads=min(case.heads, 4)) if quick else case
            report(f"checking outputs: {case.name}")
            found_here = [p for p in found if p.supports(case)]
            worst = _agreements(checked, found_here, threads=1)
            if status is not None:
                status.clear()
            heads = f" ({checked.heads} heads)" if checked.heads != case.heads else ""
            print_fn(
                f"max |kvfold - peer| over 4 steps, {case.name}{heads}: "
                + ", ".join(f"{name} {value:.0e}" for name, value in worst.items())
            )
    finally:
        set_num_threads(before)
        if status is not None:
            status.clear()
    return rows
