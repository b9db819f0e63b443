"""The checks FoldCache and its layers share: the storage dtype, a rule whose memory softmax attention
can read, and the keywords a memory class takes."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from . import rules

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def storage_dtype(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        return _DTYPES[dtype]
    if dtype not in ("float32", "float16", "bfloat16", "int8"):
        raise ValueError(f"dtype: expected 'float32', 'float16', 'bfloat16' or 'int8', got {dtype!r}")
    return dtype


def check_summary_rule(rule: rules.Rule, cache: Any = None) -> None:
    """ValueError unless ``rule`` keeps key/value slots that softmax attention can read."""
    if rule.matrix or (cache is not None and getattr(cache, "matrix_memory", False)):
        summary = ", ".join(kind.__name__ for kind in rules.kinds().values() if not kind.matrix)
        raise ValueError(
            f"rule: FoldCache needs a summary rule, one with key/value slots ({summary}), got "
            f"{type(rule).__name__}, whose memory is a d_k x d_v matrix read linearly; the model's softmax "
            "attention reads only key/value pairs"
        )


def takes(memory_class: Any, name: str) -> bool:
    return name in inspect.signature(memory_class).parameters
