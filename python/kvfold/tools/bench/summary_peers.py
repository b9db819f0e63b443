"""The summary-rule memories: kvfold's and its peers' (NumPy, PyTorch, ONNX Runtime)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ... import MemoryCache, rules
from .cases import Case

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
