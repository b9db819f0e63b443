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

from .cases import CASES, GATES, MATRIX_RULES, Case, feed, fill_tokens, make_data, repeat_first, split_gates
from .matrix_peers import ChunkedMatrix, NumpyMatrix, OrtMatrix, TorchMatrix, _matrix_kind, _ort_linear_attention
from .peers import Peer, _has_opset27, _installed, _numpy_blas_threads, peers
from .summary_peers import KvfoldMemory, NumpyMemory, OrtMemory, RingMemory, TorchCatMemory, TorchMemory
from .timing import (
    Status,
    _agreement,
    _agreements,
    _call_overhead_runner,
    _kvfold_runner,
    _peer_runner,
    _prefill_agreement,
    _report_in,
    available_cores,
    machine,
    run,
    time_per_token,
)

__all__ = [
    "CASES",
    "Case",
    "MATRIX_RULES",
    "GATES",
    "make_data",
    "split_gates",
    "fill_tokens",
    "feed",
    "repeat_first",
    "KvfoldMemory",
    "RingMemory",
    "NumpyMemory",
    "TorchMemory",
    "TorchCatMemory",
    "OrtMemory",
    "_matrix_kind",
    "ChunkedMatrix",
    "NumpyMatrix",
    "TorchMatrix",
    "_ort_linear_attention",
    "OrtMatrix",
    "Peer",
    "_installed",
    "_numpy_blas_threads",
    "peers",
    "_has_opset27",
    "_kvfold_runner",
    "_call_overhead_runner",
    "_peer_runner",
    "_agreements",
    "_agreement",
    "_prefill_agreement",
    "time_per_token",
    "Status",
    "machine",
    "available_cores",
    "_report_in",
    "run",
]
