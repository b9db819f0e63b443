"""``python -m kvfold bench``: kvfold head to head with NumPy, PyTorch and ONNX Runtime.

Every implementation runs the same computation on the same data, in this process: a decode step
(update with one token, then attend over ``[sinks | memory | window]``) or a prefill of T tokens
(``MemoryCache.forward`` in kvfold, a loop of decode steps in the summary-rule peers). The peers are
plain, fair implementations: the visible set lives in one preallocated buffer updated in place (the
window as a ring), and attention is one batched matrix product and softmax (NumPy), one
``scaled_dot_product_attention`` call (PyTorch), or the ONNX ``Attention`` operator (ONNX Runtime;
state kept by NumPy and bound without a copy). Their memory is float32; kvfold's summary rules keep
float64 accumulators, which costs kvfold a little more. One more PyTorch column, ``torch-cat``, runs
windows the way they are often written (growing tensors joined by ``torch.cat`` and sliced back to
the window, as transformers' sliding-window caches do): the straightforward code a cache usually
starts from.

Matrix rules (the linear-attention family) have their own peers: NumPy and PyTorch keep S
(H, d_k, d_v) and update it per decode step with broadcasting and batched matrix products, and run a
prefill in the chunked form (chunks of 64 tokens, batched matrix products, a triangular solve for
the delta rules); ONNX Runtime runs its ``LinearAttention`` contrib operator (com.microsoft), one
call per decode step with the state bound in place, or one call for the whole prefill.

Times are per token: the best of several rounds that take the implementations in turn, so that a busy
machine slows them alike. Ratios are peer time over kvfold time. Before timing, each peer's outputs
are checked against kvfold's.

A case is a ``Case`` entry in ``CASES``; a peer is a ``Peer`` that says which cases it ``supports``
and builds a ``memory`` for them. New rule families are added by adding entries to both.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from .. import MemoryCache, __version__, get_num_threads, rules, set_num_threads, simd_backend
from . import roofline


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
    gates: bool = False  # matrix rules: per-token decay and/or beta, one per head (as gated delta layers make them)

    @property
    def prefill(self) -> bool:
        return self.tokens > 1

    @property
    def matrix(self) -> bool:
        return isinstance(self.rule, MATRIX_RULES)


MATRIX_RULES = (rules.Linear, rules.Gated, rules.Delta, rules.GatedDelta)


CASES: List[Case] = [
    Case("decode EMA, window 0", rules.EMA(0.1)),
    Case("decode Cumulative, window 0", rules.Cumulative()),
    Case("decode W256+S4+Cumulative", rules.Cumulative(), window=256, sinks=4),
    Case("decode W256+S4+Cumulative f16", rules.Cumulative(), window=256, sinks=4, dtype="float16"),
    Case("decode W256+S4+Cumulative bf16", rules.Cumulative(), window=256, sinks=4, dtype="bfloat16"),
    Case("decode W4096+S4 (Drop)", rules.Drop(), window=4096, sinks=4),
    Case("decode W4096+S4 (Drop) f16", rules.Drop(), window=4096, sinks=4, dtype="float16"),
    Case("prefill T512 W256+S4+Cumulative", rules.Cumulative(), window=256, sinks=4, tokens=512),
    Case("prefill T2048 W256+S4+Cumulative", rules.Cumulative(), window=256, sinks=4, tokens=2048),
    Case("tiny decode EMA H1 d8", rules.EMA(0.1), heads=1, head_dim=8),
    Case("tiny decode W16 H1 d8", rules.Cumulative(), window=16, heads=1, head_dim=8),
    Case("decode Linear", rules.Linear()),
    Case("decode GatedDelta", rules.GatedDelta(), gates=True),
    Case("prefill T512 Linear", rules.Linear(), tokens=512),
    Case("prefill T2048 Linear", rules.Linear(), tokens=2048),
    Case("prefill T512 GatedDelta", rules.GatedDelta(), tokens=512, gates=True),
    Case("prefill T2048 GatedDelta", rules.GatedDelta(), tokens=2048, gates=True),
]


def make_data(case: Case, seed: int = 0) -> Dict[str, np.ndarray]:
    """Tokens for a case: q, k, v of shape (T, H, d), float32, the same for every implementation;
    for matrix rules unit-length keys (as the delta rules want them) and, with ``gates``, decay and
    beta of shape (T, H)."""
    rng = np.random.default_rng(seed)
    T = max(case.tokens, 1)
    data = {name: rng.standard_normal((T, case.heads, case.head_dim), dtype=np.float32) for name in ("q", "k", "v")}
    if case.matrix:
        data["k"] /= np.linalg.norm(data["k"], axis=-1, keepdims=True)
    if case.gates:
        decay = -rng.uniform(0.01, 0.5, (T, case.heads)).astype(np.float32)
        beta = rng.uniform(0.01, 0.99, (T, case.heads)).astype(np.float32)
        if isinstance(case.rule, (rules.Gated, rules.GatedDelta)):
            data["decay"] = decay
        if isinstance(case.rule, (rules.Delta, rules.GatedDelta)):
            data["beta"] = beta
    return data


GATES = ("decay", "beta")


def split_gates(data: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(q, k, v) and the per-token gates of a case's data."""
    return ({n: x for n, x in data.items() if n not in GATES}, {n: x for n, x in data.items() if n in GATES})


def fill_tokens(case: Case) -> int:
    """Tokens fed before a decode step is timed: sinks and window full, memory folded into."""
    return case.sinks + case.window + 3


def feed(memory: Any, data: Dict[str, np.ndarray], convert: Callable[[np.ndarray], Any] = lambda x: x) -> None:
    """Places every token of ``data`` ((T, H, d) arrays, (T, H) gates) into ``memory``, in order: one
    ``extend`` call when the memory has one (a long window then costs one copy, not one per token),
    else one ``update`` per token."""
    tokens, gates = split_gates(data)
    if hasattr(memory, "extend"):
        memory.extend(convert(tokens["k"]), convert(tokens["v"]), **{n: convert(g) for n, g in gates.items()})
        return
    for t in range(len(tokens["k"])):
        memory.update(convert(tokens["k"][t]), convert(tokens["v"][t]), **{n: convert(g[t]) for n, g in gates.items()})


def repeat_first(data: Dict[str, np.ndarray], count: int) -> Dict[str, np.ndarray]:
    """``count`` copies of the first token of ``data``: the filler before a timed decode step."""
    return {n: np.repeat(x[:1], count, axis=0) for n, x in data.items()}


# ---------------------------------------------------------------------------------------------
# Implementations. A memory takes tokens as (H, d) arrays (or tensors) and a matrix rule's gates as
# (H,) keywords: update(k, v) places one token, step(q, k, v) places one and returns the attention
# output (H, d). A memory with forward(q, k, v) takes a prefill of (T, H, d) tokens at once.


class KvfoldMemory:
    def __init__(self, case: Case) -> None:
        self.cache = MemoryCache(
            case.rule,
            num_heads=case.heads,
            head_dim=case.head_dim,
            window=case.window,
            sinks=case.sinks,
            dtype=case.dtype,
        )

    def update(self, k: np.ndarray, v: np.ndarray, **gates: np.ndarray) -> None:
        self.cache.update(k[None], v[None], **{n: g[None] for n, g in gates.items()})

    def extend(self, k: np.ndarray, v: np.ndarray, **gates: np.ndarray) -> None:
        """T tokens, (T, H, d) each and (T, H) gates, in one block."""
        k, v = (np.ascontiguousarray(x.transpose(1, 0, 2))[None] for x in (k, v))
        self.cache.update(k, v, **{n: np.ascontiguousarray(g.T)[None] for n, g in gates.items()})

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, **gates: np.ndarray) -> np.ndarray:
        return self.cache.step(q[None], k[None], v[None], **{n: g[None] for n, g in gates.items()})[0]


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


class TorchCatMemory:
    """PyTorch written the straightforward way: sinks and window are tensors that grow by
    ``torch.cat`` and are sliced back to the window (as transformers' sliding-window caches do), a
    pair leaving the window is folded into the memory slot, and attention is one
    ``scaled_dot_product_attention`` over ``torch.cat([sinks, slot, window])``."""

    def __init__(self, case: Case) -> None:
        import torch

        if not isinstance(case.rule, (rules.Drop, rules.Cumulative, rules.EMA)):
            raise ValueError(f"peers implement Drop, Cumulative and EMA memories, not {case.rule!r}")
        self.torch, self.rule, self.sinks, self.window = torch, case.rule, case.sinks, case.window
        empty = torch.zeros((case.heads, 0, case.head_dim))
        self.sink_k, self.sink_v, self.win_k, self.win_v, self.slot_k, self.slot_v = (empty,) * 6
        self.sum_k: Any = 0.0  # Cumulative's running sums
        self.sum_v: Any = 0.0
        self.seen = self.folded = 0

    def fold(self, k: Any, v: Any) -> None:
        if isinstance(self.rule, rules.Cumulative):
            self.sum_k, self.sum_v = self.sum_k + k, self.sum_v + v
            self.slot_k, self.slot_v = (x[:, None] / (self.folded + 1) for x in (self.sum_k, self.sum_v))
        elif isinstance(self.rule, rules.EMA):
            a = 1.0 if self.folded == 0 else self.rule.alpha
            self.slot_k = (1 - a) * self.slot_k + a * k[:, None] if self.folded else k[:, None]
            self.slot_v = (1 - a) * self.slot_v + a * v[:, None] if self.folded else v[:, None]
        self.folded += 1

    def update(self, k: Any, v: Any) -> None:
        self.extend(k[None], v[None])

    def extend(self, k: Any, v: Any) -> None:
        """Places T tokens, (T, H, d) each, as T updates would, with one ``torch.cat`` per tensor."""
        cat = self.torch.cat
        with self.torch.inference_mode():
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # (H, T, d)
            n = max(0, min(k.shape[1], self.sinks - self.seen))
            if n:
                self.sink_k, self.sink_v = cat([self.sink_k, k[:, :n]], 1), cat([self.sink_v, v[:, :n]], 1)
            if n < k.shape[1]:
                self.win_k, self.win_v = cat([self.win_k, k[:, n:]], 1), cat([self.win_v, v[:, n:]], 1)
                while self.win_k.shape[1] > self.window:
                    self.fold(self.win_k[:, 0], self.win_v[:, 0])
                    self.win_k, self.win_v = self.win_k[:, 1:], self.win_v[:, 1:]
        self.seen += k.shape[1]

    def step(self, q: Any, k: Any, v: Any) -> Any:
        self.update(k, v)
        with self.torch.inference_mode():
            keys = self.torch.cat([self.sink_k, self.slot_k, self.win_k], 1)
            values = self.torch.cat([self.sink_v, self.slot_v, self.win_v], 1)
            return self.torch.nn.functional.scaled_dot_product_attention(q[:, None, :], keys, values)[:, 0]


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


# ---------------------------------------------------------------------------------------------
# Matrix memories (the linear-attention family)


def _matrix_kind(case: Case) -> Optional[str]:
    """The ONNX update rule of a case the matrix peers run (per-token gates or none, no window, no
    sinks, no feature map), else None."""
    rule = case.rule
    if not case.matrix or case.window or case.sinks or case.dtype != "float32":
        return None
    if isinstance(rule, rules.Linear):
        return "linear" if rule.feature_map == "identity" and not rule.normalize and not case.gates else None
    if getattr(rule, "decay", None) is not None or getattr(rule, "beta", None) is not None or not case.gates:
        return None
    return {rules.Gated: "gated", rules.Delta: "delta", rules.GatedDelta: "gated_delta"}[type(rule)]


class ChunkedMatrix:
    """S (H, d_k, d_v) in the peer's arrays, float32. A decode step folds one token with broadcasting
    and batched matrix products, then reads S; forward runs the chunked form, chunks of 64 tokens
    with every head at once: intra-chunk attention, a triangular solve for the delta rules, and the
    chunk's state update, all as batched matrix products."""

    chunk = 64

    def __init__(self, case: Case, xp: Any, zeros: Callable[..., Any], lower: Any, eye: Any) -> None:
        kind = _matrix_kind(case)
        if kind is None:
            raise ValueError(
                f"matrix peers run Linear() and per-token gated rules without window or sinks, not {case!r}"
            )
        self.gated, self.delta = kind in ("gated", "gated_delta"), kind in ("delta", "gated_delta")
        self.xp, self.zeros, self.lower, self.eye = xp, zeros, lower, eye
        self.S = zeros((case.heads, case.head_dim, case.head_dim))
        self.scale = case.head_dim**-0.5

    def add_outer(self, k: Any, u: Any) -> None:
        """S += k u^T per head: k (H, d_k), u (H, d_v)."""
        raise NotImplementedError

    def solve_unit_lower(self, a: Any, b: Any) -> Any:
        """X with (I + a) X = b, a strictly lower triangular (H, n, n), b (H, n, d)."""
        raise NotImplementedError

    def update(self, k: Any, v: Any, decay: Any = None, beta: Any = None) -> None:
        if self.gated:
            self.S *= self.xp.exp(decay)[:, None, None]
        u = beta[:, None] * (v - (k[:, None, :] @ self.S)[:, 0]) if self.delta else v
        self.add_outer(k, u)

    def step(self, q: Any, k: Any, v: Any, **gates: Any) -> Any:
        self.update(k, v, **gates)
        return self.scale * (q[:, None, :] @ self.S)[:, 0]

    def forward(self, q: Any, k: Any, v: Any, decay: Any = None, beta: Any = None) -> Any:
        xp = self.xp
        q, k, v = (x.swapaxes(0, 1) for x in (q, k, v))  # (H, T, d)
        H, T, dv = v.shape
        out = self.zeros((H, T, dv))
        S = self.S
        for first in range(0, T, self.chunk):
            end = min(T, first + self.chunk)
            n = end - first
            qc, kc, vc = q[:, first:end], k[:, first:end], v[:, first:end]
            lower, strict = self.lower[:n, :n], self.lower[:n, :n] & ~self.eye[:n, :n]
            D = None
            if self.gated:  # g: cumulative log decay; D[t, s] = exp(g_t - g_s) for s <= t, else 0
                g = decay[first:end].T.cumsum(1)
                D = xp.exp(xp.where(lower, g[:, :, None] - g[:, None, :], -xp.inf))
            u = vc
            if self.delta:
                b = beta[first:end].T[:, :, None]
                A = kc @ kc.swapaxes(1, 2)
                A = xp.where(strict, A * D if self.gated else A, 0) * b
                wk = b * kc * (xp.exp(g)[:, :, None] if self.gated else 1)
                u = self.solve_unit_lower(A, b * vc) - self.solve_unit_lower(A, wk) @ S
            P = qc @ kc.swapaxes(1, 2)
            P = xp.where(lower, P * D if self.gated else P, 0)
            past = qc @ S
            if self.gated:
                past = past * xp.exp(g)[:, :, None]
                S = xp.exp(g[:, -1])[:, None, None] * S + (kc * xp.exp(g[:, -1:] - g)[:, :, None]).swapaxes(1, 2) @ u
            else:
                S = S + kc.swapaxes(1, 2) @ u
            out[:, first:end] = self.scale * (past + P @ u)
        self.S = S
        return out.swapaxes(0, 1)


class NumpyMatrix(ChunkedMatrix):
    def __init__(self, case: Case) -> None:
        n = self.chunk
        super().__init__(
            case, np, lambda shape: np.zeros(shape, np.float32), np.tri(n, dtype=bool), np.eye(n, dtype=bool)
        )

    def add_outer(self, k: np.ndarray, u: np.ndarray) -> None:
        self.S += k[:, :, None] * u[:, None, :]

    def solve_unit_lower(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.solve(a + np.eye(a.shape[-1], dtype=np.float32), b)


class TorchMatrix(ChunkedMatrix):
    def __init__(self, case: Case) -> None:
        import torch

        self.torch = torch
        n = self.chunk
        super().__init__(
            case,
            torch,
            lambda shape: torch.zeros(shape, dtype=torch.float32),
            torch.ones(n, n, dtype=torch.bool).tril(),
            torch.eye(n, dtype=torch.bool),
        )

    def add_outer(self, k: Any, u: Any) -> None:
        self.S.baddbmm_(k[:, :, None], u[:, None, :])

    def solve_unit_lower(self, a: Any, b: Any) -> Any:
        return self.torch.linalg.solve_triangular(a, b, upper=False, unitriangular=True)

    def step(self, q: Any, k: Any, v: Any, **gates: Any) -> Any:
        with self.torch.inference_mode():
            return super().step(q, k, v, **gates)

    def forward(self, q: Any, k: Any, v: Any, decay: Any = None, beta: Any = None) -> Any:
        with self.torch.inference_mode():
            return super().forward(q, k, v, decay, beta)


@functools.lru_cache(maxsize=None)
def _ort_linear_attention(kind: str, heads: int, head_dim: int, threads: int, domain: str) -> Any:
    """A session of ONNX Runtime's LinearAttention for any T: the contrib operator (domain
    com.microsoft) or the ONNX operator (opset 27, domain "")."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    H, d, f = heads, head_dim, TensorProto.FLOAT
    shapes = {
        "query": [1, "T", H * d],
        "key": [1, "T", H * d],
        "value": [1, "T", H * d],
        "past_state": [1, H, d, d],
        "decay": [1, "T", H],
        "beta": [1, "T", H],
    }
    names = [
        "query",
        "key",
        "value",
        "past_state",
        "decay" if "gated" in kind else "",
        "beta" if "delta" in kind else "",
    ]
    while not names[-1]:
        names.pop()
    inputs = [helper.make_tensor_value_info(n, f, shapes[n]) for n in names if n]
    outputs = [
        helper.make_tensor_value_info("output", f, [1, "T", H * d]),
        helper.make_tensor_value_info("present_state", f, [1, H, d, d]),
    ]
    node = helper.make_node(
        "LinearAttention",
        names,
        ["output", "present_state"],
        domain=domain,
        q_num_heads=H,
        kv_num_heads=H,
        update_rule=kind,
    )
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid(domain, 1)] if domain else [helper.make_opsetid("", 27)]
    model = helper.make_model(helper.make_graph([node], "linear_attention", inputs, outputs), opset_imports=opsets)
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class OrtMatrix:
    """ONNX Runtime's LinearAttention: a decode step is one run with T = 1 and the state bound in
    place (two buffers taken in turn, so it is never copied); forward is one run over all T tokens
    from a zero state."""

    def __init__(self, case: Case, threads: int, domain: str = "com.microsoft") -> None:
        kind = _matrix_kind(case)
        if kind is None:
            raise ValueError(
                f"matrix peers run Linear() and per-token gated rules without window or sinks, not {case!r}"
            )
        H, d = case.heads, case.head_dim
        self.heads = H
        self.session = _ort_linear_attention(kind, H, d, threads, domain)
        self.zero = np.zeros((1, H, d, d), np.float32)
        self.state = [np.zeros((1, H, d, d), np.float32) for _ in range(2)]
        self.inputs = {n: np.zeros((1, 1, H * d), np.float32) for n in ("query", "key", "value")}
        self.inputs.update({n: np.zeros((1, 1, H), np.float32) for n in ("decay", "beta") if n in self.names()})
        self.y = np.zeros((1, 1, H * d), np.float32)
        self.bindings = []
        for past, present in ((0, 1), (1, 0)):
            b = self.session.io_binding()
            for name, array in self.inputs.items():
                b.bind_cpu_input(name, array)
            b.bind_cpu_input("past_state", self.state[past])
            b.bind_output("output", "cpu", 0, np.float32, list(self.y.shape), self.y.ctypes.data)
            b.bind_output("present_state", "cpu", 0, np.float32, list(self.zero.shape), self.state[present].ctypes.data)
            self.bindings.append(b)
        self.turn = 0

    def names(self) -> List[str]:
        return [i.name for i in self.session.get_inputs()]

    def update(self, k: np.ndarray, v: np.ndarray, **gates: np.ndarray) -> None:
        self.step(np.zeros_like(k), k, v, **gates)

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, **gates: np.ndarray) -> np.ndarray:
        for name, x in (("query", q), ("key", k), ("value", v), *gates.items()):
            self.inputs[name][0, 0] = x.reshape(-1)
        self.session.run_with_iobinding(self.bindings[self.turn])
        self.turn ^= 1
        return self.y[0, 0].reshape(self.heads, -1)

    def forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, **gates: np.ndarray) -> np.ndarray:
        T = q.shape[0]
        feeds = {
            "query": q.reshape(1, T, -1),
            "key": k.reshape(1, T, -1),
            "value": v.reshape(1, T, -1),
            "past_state": self.zero,
            **{n: g[None] for n, g in gates.items()},
        }
        return self.session.run(["output"], feeds)[0].reshape(T, self.heads, -1)


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

    def runs(c: Case) -> bool:
        return isinstance(c.rule, summary_rules) or _matrix_kind(c) is not None

    return [
        Peer(
            "numpy",
            True,
            runs,
            lambda c, n: NumpyMatrix(c) if c.matrix else NumpyMemory(c),
            set_threads=_numpy_blas_threads(),
            version=np.__version__,
        ),
        Peer(
            "torch",
            torch is not None,
            runs,
            lambda c, n: TorchMatrix(c) if c.matrix else TorchMemory(c),
            convert=(lambda x: torch.from_numpy(np.ascontiguousarray(x))) if torch else (lambda x: x),
            set_threads=(lambda n: torch.set_num_threads(n)) if torch else (lambda n: None),
            version=getattr(torch, "__version__", ""),
        ),
        # The same computation as PyTorch users often write it (growing tensors, torch.cat): for reference.
        Peer(
            "torch-cat",
            torch is not None,
            lambda c: isinstance(c.rule, summary_rules) and c.window > 0,
            lambda c, n: TorchCatMemory(c),
            convert=(lambda x: torch.from_numpy(np.ascontiguousarray(x))) if torch else (lambda x: x),
            set_threads=(lambda n: torch.set_num_threads(n)) if torch else (lambda n: None),
            version=getattr(torch, "__version__", ""),
        ),
        Peer(
            "onnxruntime",
            ort is not None,
            lambda c: (
                (isinstance(c.rule, summary_rules) and c.window > 0 and not c.prefill) or _matrix_kind(c) is not None
            ),
            lambda c, n: OrtMatrix(c, n) if c.matrix else OrtMemory(c, n),
            version=getattr(ort, "__version__", ""),
        ),
        # The same runtime's ONNX-standard operator (opset 27), slower than its contrib twin: for reference.
        Peer(
            "onnxruntime-opset27",
            ort is not None and _has_opset27(ort),
            lambda c: _matrix_kind(c) is not None,
            lambda c, n: OrtMatrix(c, n, domain=""),
            version=getattr(ort, "__version__", ""),
        ),
    ]


def _has_opset27(ort: Any) -> bool:
    """Whether this ONNX Runtime runs the ONNX LinearAttention operator (opset 27)."""
    try:
        _ort_linear_attention("linear", 1, 1, 1, "")
        return True
    except Exception:  # an older runtime refuses the opset or the operator
        return False


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
    `round_seconds`), which sizes its rounds to about `round_seconds`. With several threads, each
    runner's turn starts `settle_seconds` after the previous one ends: thread pools (OpenBLAS,
    OpenMP, ONNX Runtime) keep spinning for a while after their work and would otherwise take cores
    from whichever runner comes next. `progress` hears what runs next."""
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
                times = time_per_token(
                    runners,
                    case.tokens,
                    rounds,
                    round_seconds,
                    settle_seconds=0.1 if n > 1 else 0.0,
                    warmup_calls=1 if quick else 2,
                    progress=functools.partial(_report_in, report, where),
                )
                row = {"case": case.name, "threads": n, "us": {k: t * 1e6 for k, t in times.items()}}
                bound = None
                if n == 1:  # the bounds are one core's
                    report(f"{where} read bandwidth at its working set")
                    bound = roof.bound(case)
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
