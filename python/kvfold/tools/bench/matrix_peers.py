"""The matrix-rule memories of the peers (NumPy, PyTorch, ONNX Runtime's LinearAttention)."""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional

import numpy as np

from ... import rules
from .cases import Case

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
