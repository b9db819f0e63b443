"""The peers this machine has, and which cases each runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ... import rules
from . import ggml_peer
from .cases import Case
from .matrix_peers import NumpyMatrix, OrtMatrix, TorchMatrix, _matrix_kind, _ort_linear_attention
from .summary_peers import NumpyMemory, OrtMemory, TorchCatMemory, TorchMemory


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
    """The peers of this machine: NumPy always; PyTorch, ONNX Runtime and ggml (llama.cpp's kernels,
    from the ggml-python package) when installed."""
    summary_rules = (rules.Drop, rules.Cumulative, rules.EMA)
    torch = _installed("torch")
    ort = _installed("onnxruntime") if _installed("onnx") else None
    ggml = _installed("ggml")

    with_torch: Dict[str, Any] = {  # tensors from the NumPy data, torch's threads
        "convert": (lambda x: torch.from_numpy(np.ascontiguousarray(x))) if torch else (lambda x: x),
        "set_threads": (lambda n: torch.set_num_threads(n)) if torch else (lambda n: None),
        "version": getattr(torch, "__version__", ""),
    }

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
            **with_torch,
        ),
        # The same computation as PyTorch users often write it (growing tensors, torch.cat): for reference.
        Peer(
            "torch-cat",
            torch is not None,
            lambda c: isinstance(c.rule, summary_rules) and c.window > 0,
            lambda c, n: TorchCatMemory(c),
            **with_torch,
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
        # llama.cpp's flash attention over a cache in the case's own storage type (q8_0 for int8).
        Peer(
            "ggml",
            ggml is not None,
            ggml_peer.supports,
            lambda c, n: ggml_peer.GgmlMemory(c, n),
            version=getattr(ggml, "__version__", ""),
        ),
    ]


def _has_opset27(ort: Any) -> bool:
    """Whether this ONNX Runtime runs the ONNX LinearAttention operator (opset 27)."""
    try:
        _ort_linear_attention("linear", 1, 1, 1, "")
        return True
    except Exception:  # an older runtime refuses the opset or the operator
        return False
