"""``python -m kvfold bench``: kvfold head to head with NumPy, PyTorch and ONNX Runtime.

Every implementation runs the same computation on the same data, in this process: a decode step
(update with one token, then attend over ``[sinks | memory | window]``) or a prefill of T tokens
(``MemoryCache.forward`` in kvfold, a loop of decode steps in the peers). The peers are plain,
fair implementations: the visible set lives in one preallocated buffer updated in place (the window
as a ring), and attention is one batched matrix product and softmax (NumPy), one
``scaled_dot_product_attention`` call (PyTorch), or the ONNX ``Attention`` operator (ONNX Runtime;
state kept by NumPy and bound without a copy). Their memory is float32; kvfold's summary rules keep
float64 accumulators, which costs kvfold a little more.

Times are per token: the best of several rounds that take the implementations in turn, so that a busy
machine slows them alike. Ratios are peer time over kvfold time. Before timing, each peer's outputs
are checked against kvfold's.

A case is a ``Case`` entry in ``CASES``; a peer is a ``Peer`` that says which cases it ``supports``
and builds a ``memory`` for them. New rule families are added by adding entries to both.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from . import MemoryCache, __version__, get_num_threads, rules, set_num_threads, simd_backend


@dataclass(frozen=True)
class Case:
    """One benchmark: a memory configuration and what is timed (B = 1, query heads = KV heads)."""

    name: str
    rule: rules.Rule
    window: int = 0
    sinks: int = 0
    tokens: int = 1  # 1: one decode step; T > 1: a prefill of T tokens from an empty cache
    dtype: str = "float32"
    heads: int = 32
    head_dim: int = 128

    @property
    def prefill(self) -> bool:
        return self.tokens > 1


CASES: List[Case] = [
    Case("decode EMA, window 0", rules.EMA(0.1)),
    Case("decode Cumulative, window 0", rules.Cumulative()),
    Case("decode W256+S4+Cumulative", rules.Cumulative(), window=256, sinks=4),
    Case("decode W256+S4+Cumulative f16", rules.Cumulative(), window=256, sinks=4, dtype="float16"),
    Case("decode W4096+S4 (Drop)", rules.Drop(), window=4096, sinks=4),
    Case("decode W4096+S4 (Drop) f16", rules.Drop(), window=4096, sinks=4, dtype="float16"),
    Case("prefill T512 W256+S4+Cumulative", rules.Cumulative(), window=256, sinks=4, tokens=512),
    Case("prefill T2048 W256+S4+Cumulative", rules.Cumulative(), window=256, sinks=4, tokens=2048),
    Case("tiny decode EMA H1 d8", rules.EMA(0.1), heads=1, head_dim=8),
    Case("tiny decode W16 H1 d8", rules.Cumulative(), window=16, heads=1, head_dim=8),
]


def make_data(case: Case, seed: int = 0) -> Dict[str, np.ndarray]:
    """Tokens for a case: q, k, v of shape (T, H, d), float32, the same for every implementation."""
    rng = np.random.default_rng(seed)
    shape = (max(case.tokens, 1), case.heads, case.head_dim)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name in ("q", "k", "v")}


def fill_tokens(case: Case) -> int:
    """Tokens fed before a decode step is timed: sinks and window full, memory folded into."""
    return case.sinks + case.window + 3


# ---------------------------------------------------------------------------------------------
# Implementations. A memory takes tokens as (H, d) arrays (or tensors): update(k, v) places one
# token, step(q, k, v) places one and returns the attention output (H, d).


class KvfoldMemory:
    def __init__(self, case: Case) -> None:
        self.cache = MemoryCache(case.rule, num_heads=case.heads, head_dim=case.head_dim, window=case.window,
                                 sinks=case.sinks, dtype=case.dtype)

    def update(self, k: np.ndarray, v: np.ndarray) -> None:
        self.cache.update(k[None], v[None])

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.cache.step(q[None], k[None], v[None])[0]


class RingMemory:
    """The visible set of a peer in one buffer per head: rows [slot | sinks | window ring]. Valid
    rows are always one contiguous range, so attention reads a view and never copies."""

    def __init__(self, case: Case, zeros: Callable[..., Any]) -> None:
        if not isinstance(case.rule, (rules.Drop, rules.Cumulative, rules.EMA)):
            raise ValueError(f"peers implement Drop, Cumulative and EMA memories, not {case.rule!r}")
        self.rule = case.rule
        self.slots = 0 if isinstance(case.rule, rules.Drop) else 1
        self.sinks, self.window = case.sinks, case.window
        rows = self.slots + self.sinks + self.window
        self.K = zeros((case.heads, rows, case.head_dim))
        self.V = zeros((case.heads, rows, case.head_dim))
        self.sum_k = zeros((case.heads, case.head_dim))  # Cumulative's running sums
        self.sum_v = zeros((case.heads, case.head_dim))
        self.scale = case.head_dim**-0.5
        self.seen = 0
        self.folded = 0

    def fold(self, k: Any, v: Any) -> None:
        if isinstance(self.rule, rules.Cumulative):
            self.sum_k += k
            self.sum_v += v
            self.K[:, 0] = self.sum_k / (self.folded + 1)
            self.V[:, 0] = self.sum_v / (self.folded + 1)
        elif isinstance(self.rule, rules.EMA):
            a = 1.0 if self.folded == 0 else self.rule.alpha
            self.K[:, 0] = (1 - a) * self.K[:, 0] + a * k
            self.V[:, 0] = (1 - a) * self.V[:, 0] + a * v
        self.folded += 1

    def update(self, k: Any, v: Any) -> None:
        t = self.seen
        if t < self.sinks:
            self.K[:, self.slots + t] = k
            self.V[:, self.slots + t] = v
        elif self.window == 0:
            self.fold(k, v)
        else:
            j = t - self.sinks
            row = self.slots + self.sinks + j % self.window
            if j >= self.window:  # the pair leaving the window is folded before it is overwritten
                self.fold(self.K[:, row], self.V[:, row])
            self.K[:, row] = k
            self.V[:, row] = v
        self.seen += 1

    def visible(self) -> slice:
        held = min(self.seen, self.sinks) + min(max(self.seen - self.sinks, 0), self.window)
        first = 0 if self.folded else self.slots
        return slice(first, self.slots + held)


class NumpyMemory(RingMemory):
    def __init__(self, case: Case) -> None:
        super().__init__(case, lambda shape: np.zeros(shape, np.float32))

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        self.update(k, v)
        rows = self.visible()
        s = np.matmul(q[:, None, :], self.K[:, rows].transpose(0, 2, 1))
        s *= self.scale
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return np.matmul(s, self.V[:, rows])[:, 0]


class TorchMemory(RingMemory):
    def __init__(self, case: Case) -> None:
        import torch

        self.torch = torch
        self.sdpa = torch.nn.functional.scaled_dot_product_attention
        super().__init__(case, lambda shape: torch.zeros(shape, dtype=torch.float32))

    def step(self, q: Any, k: Any, v: Any) -> Any:
        with self.torch.inference_mode():
            self.update(k, v)
            rows = self.visible()
            return self.sdpa(q[:, None, :], self.K[:, rows], self.V[:, rows])[:, 0]


class OrtMemory(NumpyMemory):
    """NumPy keeps the memory; ONNX Runtime's Attention operator reads the whole buffer in place."""

    def __init__(self, case: Case, threads: int) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        super().__init__(case)
        H, n, d = self.K.shape
        spec = {"q": [1, H, 1, d], "k": [1, H, n, d], "v": [1, H, n, d], "y": [1, H, 1, d]}
        io = {name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in spec.items()}
        node = helper.make_node("Attention", ["q", "k", "v"], ["y"], scale=self.scale)
        graph = helper.make_graph([node], "decode", [io["q"], io["k"], io["v"]], [io["y"]])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.q = np.zeros((1, H, 1, d), np.float32)
        self.y = np.zeros((1, H, 1, d), np.float32)
        for name, array in (("q", self.q), ("k", self.K[None]), ("v", self.V[None])):
            self.binding.bind_cpu_input(name, array)
        self.binding.bind_output("y", "cpu", 0, np.float32, list(self.y.shape), self.y.ctypes.data)

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        self.update(k, v)
        if self.visible() != slice(0, self.K.shape[1]):
            raise ValueError("the ONNX Runtime peer attends over a full buffer: fill the memory first")
        self.q[0, :, 0] = q
        self.session.run_with_iobinding(self.binding)
        return self.y[0, :, 0]


@dataclass
class Peer:
    name: str
    available: bool
    supports: Callable[[Case], bool]
    memory: Callable[[Case, int], Any]  # (case, threads) -> memory
    convert: Callable[[np.ndarray], Any] = lambda x: x  # the peer's own array type
    set_threads: Callable[[int], None] = lambda n: None
    version: str = ""


def _installed(module: str) -> Optional[Any]:
    try:
        return __import__(module)
    except ImportError:
        return None


def _numpy_blas_threads() -> Callable[[int], None]:
    """Sets the threads of the OpenBLAS that NumPy wheels bundle, when it can be found."""
    import ctypes
    import glob

    for path in glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):
                return getattr(lib, name)
    return lambda n: None


def peers() -> List[Peer]:
    """The peers of this machine: NumPy always, PyTorch and ONNX Runtime when installed."""
    summary_rules = (rules.Drop, rules.Cumulative, rules.EMA)
    torch = _installed("torch")
    ort = _installed("onnxruntime") if _installed("onnx") else None
    return [
        Peer("numpy", True, lambda c: isinstance(c.rule, summary_rules), lambda c, n: NumpyMemory(c),
             set_threads=_numpy_blas_threads(), version=np.__version__),
        Peer("torch", torch is not None, lambda c: isinstance(c.rule, summary_rules), lambda c, n: TorchMemory(c),
             convert=(lambda x: torch.from_numpy(np.ascontiguousarray(x))) if torch else (lambda x: x),
             set_threads=(lambda n: torch.set_num_threads(n)) if torch else (lambda n: None),
             version=getattr(torch, "__version__", "")),
        Peer("onnxruntime", ort is not None,
             lambda c: isinstance(c.rule, summary_rules) and c.window > 0 and not c.prefill,
             lambda c, n: OrtMemory(c, n), version=getattr(ort, "__version__", "")),
    ]


# ---------------------------------------------------------------------------------------------
# Timing


def _kvfold_runner(case: Case, data: Dict[str, np.ndarray]) -> Callable[[], Any]:
    """kvfold called as a user would: (B, H, d) or (B, H, T, d) arrays in, a new array out."""
    if case.prefill:
        q, k, v = (np.ascontiguousarray(data[name].transpose(1, 0, 2))[None] for name in ("q", "k", "v"))
        return lambda: KvfoldMemory(case).cache.forward(q, k, v)
    memory = KvfoldMemory(case)
    for _ in range(fill_tokens(case)):
        memory.update(data["k"][0], data["v"][0])
    q, k, v = (data[name][0][None] for name in ("q", "k", "v"))
    return lambda: memory.cache.step(q, k, v)


def _peer_runner(memory_for: Callable[[], Any], case: Case, data: Dict[str, Any]) -> Callable[[], Any]:
    """A peer's decode step, or its prefill: a loop of decode steps from an empty memory."""
    q, k, v = data["q"], data["k"], data["v"]
    if case.prefill:
        def prefill() -> Any:
            memory = memory_for()
            for t in range(case.tokens):
                out = memory.step(q[t], k[t], v[t])
            return out

        return prefill
    memory = memory_for()
    for _ in range(fill_tokens(case)):
        memory.update(k[0], v[0])
    q0, k0, v0 = q[0], k[0], v[0]
    return lambda: memory.step(q0, k0, v0)


def _agreement(case: Case, peer: Peer, threads: int, steps: int = 4) -> float:
    """Largest difference between kvfold's and the peer's outputs over a few decode steps, once
    sinks, window and memory are full."""
    data = make_data(case, seed=1)
    ours, theirs = KvfoldMemory(case), peer.memory(replace(case, tokens=1), threads)
    rng = np.random.default_rng(2)
    fill = rng.standard_normal((fill_tokens(case) + steps, case.heads, case.head_dim), dtype=np.float32)
    worst = 0.0
    for t in range(fill_tokens(case)):
        ours.update(fill[t], fill[-t - 1])
        theirs.update(peer.convert(fill[t]), peer.convert(fill[-t - 1]))
    for t in range(steps):
        q, k, v = data["q"][0] * (t + 1), fill[t], fill[t + 1]
        a = ours.step(q, k, v)
        b = np.asarray(theirs.step(peer.convert(q), peer.convert(k), peer.convert(v)))
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def time_per_token(runners: Dict[str, Callable[[], Any]], tokens: int, rounds: int = 5,
                   round_seconds: float = 0.15) -> Dict[str, float]:
    """Seconds per token of each runner: the best of `rounds` rounds that take the runners in turn."""
    calls = {}
    for name, run in runners.items():  # warm up, and size each round to about round_seconds
        start, n = time.perf_counter(), 0
        while n < 2 or (time.perf_counter() - start < round_seconds / 4 and n < 100_000):
            run()
            n += 1
        calls[name] = max(1, int(n * round_seconds / 4 / max(time.perf_counter() - start, 1e-9)))
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                run()
            best[name] = min(best[name], (time.perf_counter() - start) / calls[name] / tokens)
    return best


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


def run(cases: Sequence[Case] = tuple(CASES), threads: Sequence[int] = (), rounds: int = 5,
        round_seconds: float = 0.15, print_fn: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Times every case for kvfold and each installed peer; prints tables; returns the rows."""
    threads = list(threads) or sorted({1, available_cores()})
    found = [p for p in peers() if p.available]
    before = get_num_threads()
    print_fn(f"kvfold {__version__} bench on {machine()}; SIMD kernels: {simd_backend()}")
    print_fn("peers: " + ", ".join(f"{p.name} {p.version}" for p in found) +
             "; B=1, query heads = KV heads, d_k = d_v, float32 unless marked f16 (kvfold's storage)")
    print_fn("times in microseconds per token; (N.Nx) = peer time / kvfold time; - = peer does not run this case")
    rows: List[Dict[str, Any]] = []
    try:
        for n in threads:
            set_num_threads(n)
            for p in found:
                p.set_threads(n)
            header = f"{'threads: ' + str(n):38s} {'kvfold':>9s}" + "".join(f" {p.name:>20s}" for p in found)
            print_fn("")
            print_fn(header)
            for case in cases:
                data = make_data(case)
                runners = {"kvfold": _kvfold_runner(case, data)}
                for p in found:
                    if p.supports(case):
                        pdata = {key: p.convert(value) for key, value in data.items()}
                        runners[p.name] = _peer_runner(lambda p=p, c=case, n=n: p.memory(replace(c, tokens=1), n),
                                                       case, pdata)
                times = time_per_token(runners, case.tokens, rounds, round_seconds)
                row = {"case": case.name, "threads": n, "us": {k: t * 1e6 for k, t in times.items()}}
                cells = f"{case.name:38s} {times['kvfold'] * 1e6:9.2f}"
                for p in found:
                    if p.name in times:
                        cells += f" {times[p.name] * 1e6:11.1f} ({times[p.name] / times['kvfold']:5.1f}x)"
                    else:
                        cells += f" {'-':>20s}"
                print_fn(cells)
                rows.append(row)
    finally:
        set_num_threads(before)
    print_fn("")
    for case in cases:
        if not case.prefill:
            checks = [f"{p.name} {_agreement(case, p, 1):.0e}" for p in found if p.supports(case)]
            print_fn(f"max |kvfold - peer| over 4 steps, {case.name}: " + ", ".join(checks))
    return rows
