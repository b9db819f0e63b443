"""llama.cpp's attention as a peer: ggml's flash attention over a KV cache stored as llama.cpp stores
it (one row of all heads per token; float32, float16, bfloat16 or q8_0), from the ggml-python package."""

from __future__ import annotations

import ctypes
from typing import Any, Tuple

import numpy as np

from ... import rules
from .cases import Case

GGML_TYPES = {
    "float32": "GGML_TYPE_F32",
    "float16": "GGML_TYPE_F16",
    "bfloat16": "GGML_TYPE_BF16",
    "int8": "GGML_TYPE_Q8_0",
}


def supports(case: Case) -> bool:
    """A sliding window with sinks (StreamingLLM, as llama.cpp's context shift keeps it), decode only."""
    return isinstance(case.rule, rules.Drop) and case.window > 0 and not case.prefill and case.dtype in GGML_TYPES


class GgmlMemory:
    """Sinks and a window ring in one cache tensor per K and V, `(rows, H * d)`; a step writes its token
    with `ggml_set_rows` and attends with `ggml_flash_attn_ext`, one prebuilt graph computed per step,
    as a llama.cpp decode step does for one layer."""

    def __init__(self, case: Case, threads: int) -> None:
        import ggml

        if not supports(case):
            raise ValueError(f"the ggml peer runs sliding-window decode steps, not {case.name!r}")
        self.ggml, self.threads = ggml, threads
        self.sinks, self.window, self.seen = case.sinks, case.window, 0
        H, d = case.heads, case.head_dim
        rows = case.sinks + case.window
        kind = getattr(ggml, GGML_TYPES[case.dtype])
        cache_bytes = 2 * ggml.ggml_row_size(kind, H * d) * rows
        params = ggml.ggml_init_params(mem_size=cache_bytes + 64 * 2**20, mem_buffer=None, no_alloc=False)
        self.ctx = ggml.ggml_init(params)
        f32 = ggml.GGML_TYPE_F32
        self.k_cache = ggml.ggml_new_tensor_2d(self.ctx, kind, H * d, rows)
        self.v_cache = ggml.ggml_new_tensor_2d(self.ctx, kind, H * d, rows)
        k_cur = ggml.ggml_new_tensor_2d(self.ctx, f32, H * d, 1)
        v_cur = ggml.ggml_new_tensor_2d(self.ctx, f32, H * d, 1)
        q = ggml.ggml_new_tensor_3d(self.ctx, f32, d, 1, H)
        row = ggml.ggml_new_tensor_1d(self.ctx, ggml.GGML_TYPE_I64, 1)
        self.inputs = {
            name: self._array(t, shape)
            for name, t, shape in (("k", k_cur, (H, d)), ("v", v_cur, (H, d)), ("q", q, (H, d)))
        }
        self.row = np.ctypeslib.as_array(ctypes.cast(ggml.ggml_get_data(row), ctypes.POINTER(ctypes.c_int64)), (1,))

        def write(graph: Any) -> None:
            ggml.ggml_build_forward_expand(graph, ggml.ggml_set_rows(self.ctx, self.k_cache, k_cur, row))
            ggml.ggml_build_forward_expand(graph, ggml.ggml_set_rows(self.ctx, self.v_cache, v_cur, row))

        def heads_view(cache: Any) -> Any:  # (d, rows, H) over the (rows, H * d) cache, as llama.cpp views it
            view = ggml.ggml_view_3d(
                self.ctx, cache, d, H, rows, ggml.ggml_row_size(kind, d), ggml.ggml_row_size(kind, H * d), 0
            )
            return ggml.ggml_permute(self.ctx, view, 0, 2, 1, 3)

        self.write_graph = ggml.ggml_new_graph(self.ctx)
        write(self.write_graph)
        self.step_graph = ggml.ggml_new_graph(self.ctx)
        write(self.step_graph)
        out = ggml.ggml_flash_attn_ext(
            self.ctx, q, heads_view(self.k_cache), heads_view(self.v_cache), None, d**-0.5, 0.0, 0.0
        )
        ggml.ggml_build_forward_expand(self.step_graph, out)
        self.out = self._array(out, (H, d))

    def _array(self, tensor: Any, shape: Tuple[int, ...]) -> np.ndarray:
        data = ctypes.cast(self.ggml.ggml_get_data(tensor), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(data, shape)

    def __del__(self) -> None:
        if getattr(self, "ctx", None) is not None:
            self.ggml.ggml_free(self.ctx)

    def _place(self, k: np.ndarray, v: np.ndarray) -> None:
        t = self.seen
        self.row[0] = t if t < self.sinks else self.sinks + (t - self.sinks) % self.window
        self.inputs["k"][...] = k
        self.inputs["v"][...] = v
        self.seen += 1

    def update(self, k: np.ndarray, v: np.ndarray) -> None:
        self._place(k, v)
        self.ggml.ggml_graph_compute_with_ctx(self.ctx, self.write_graph, self.threads)

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.seen + 1 < self.sinks + self.window:
            raise ValueError("the ggml peer attends only once its sinks and window are full")
        self._place(k, v)
        self.inputs["q"][...] = q
        self.ggml.ggml_graph_compute_with_ctx(self.ctx, self.step_graph, self.threads)
        return self.out.copy()  # a new array, as kvfold returns: the buffer is the context's
