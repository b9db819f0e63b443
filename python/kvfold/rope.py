"""``RoPE``: how a model rotates its keys by position, so that a memory can fold keys without it.

Keys in a model's cache are rotated by the rotary embedding at their position. An average of keys rotated
at many positions is not a key the model learned to look for; a cache made with a ``RoPE`` un-rotates
each pair as it is folded (``Rot(k, -p)``), folds its position with it, and rotates a memory slot's key
back at the slot's position when attention reads it. The rotation itself, in NumPy, is
``kvfold.reference.rotate``.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from ._checks import integer

__all__ = ["RoPE"]

LAYOUTS = ("half", "interleaved")


@dataclass(frozen=True)
class RoPE:
    """Rotary position embedding of keys: rotation angle ``p * theta ** (-2 i / dim)`` for pair i at position p.

    ``dim``: the dimensions rotated, from the start of the head (even; ``None`` means the whole head,
    and it may not exceed the head size). ``layout``: which dimensions form pair i: ``"half"`` pairs
    ``i`` and ``i + dim/2`` (Hugging Face Llama's ``rotate_half``), ``"interleaved"`` pairs ``2i`` and
    ``2i + 1`` (the original RoFormer and GPT-J layout). Pair ``(a, b)`` rotated by angle ``t`` is
    ``(a cos t - b sin t, b cos t + a sin t)``; dimensions from ``dim`` on are left as they are.
    ``frequencies``: the angle per position of each pair, ``dim / 2`` finite numbers in place of
    ``theta ** (-2 i / dim)``: a model's scaled RoPE (``linear``, ``llama3``, ``yarn``), as
    ``from_config`` reads it; ``None``: theta's.
    """

    theta: float
    dim: Optional[int] = None
    layout: str = "half"
    frequencies: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        theta = self.theta
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real):
            raise TypeError(f"RoPE: theta must be a real number, got {type(theta).__name__} {theta!r}")
        if not (math.isfinite(float(theta)) and float(theta) > 0):
            raise ValueError(f"RoPE: theta must be a finite number > 0, got {theta!r}")
        object.__setattr__(self, "theta", float(theta))
        if self.dim is not None:
            dim = integer("RoPE: dim", self.dim, minimum=2)
            if dim % 2:
                raise ValueError(f"RoPE: dim must be even (dimensions are rotated in pairs), got {dim}")
            object.__setattr__(self, "dim", dim)
        if not isinstance(self.layout, str):
            raise TypeError(f"RoPE: layout must be 'half' or 'interleaved', got {type(self.layout).__name__}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"RoPE: layout must be 'half' or 'interleaved', got {self.layout!r}")
        if self.frequencies is not None:
            object.__setattr__(self, "frequencies", _frequencies(self.frequencies))
            if self.dim is not None and len(self.frequencies) != self.dim // 2:
                raise ValueError(
                    f"RoPE: frequencies: expected dim / 2 = {self.dim // 2} values (one per rotated pair), "
                    f"got {len(self.frequencies)}"
                )

    def __repr__(self) -> str:
        text = f"RoPE(theta={self.theta!r}, dim={self.dim!r}, layout={self.layout!r}"
        return text + ("" if self.frequencies is None else f", frequencies={self.frequencies!r}") + ")"

    def rotated_dims(self, head_dim: int) -> int:
        """The dimensions rotated in a head of ``head_dim``; ValueError if ``dim`` does not fit."""
        if self.dim is None:
            if head_dim % 2:
                raise ValueError(f"rope: a RoPE over the whole head needs an even head_dim, got {head_dim}")
            if self.frequencies is not None and len(self.frequencies) != head_dim // 2:
                raise ValueError(
                    f"rope: frequencies: expected head_dim / 2 = {head_dim // 2} values (one per rotated pair), "
                    f"got {len(self.frequencies)}"
                )
            return head_dim
        if self.dim > head_dim:
            raise ValueError(f"rope: dim must be at most head_dim={head_dim}, got dim={self.dim}")
        return self.dim

    @classmethod
    def from_config(cls, config: Any, layer_type: Optional[str] = None) -> "RoPE":
        """The RoPE of a Hugging Face Llama-family config (``rope_parameters`` or ``rope_theta``, and
        ``partial_rotary_factor``). A scaled RoPE (``rope_type`` ``linear``, ``llama3``, ``yarn``, ...) gets
        its frequencies from transformers, as the model computes them; ValueError for the types whose
        frequencies change with the sequence length (``dynamic``, ``longrope``). ``layer_type``: the layer's
        type (``config.layer_types[i]``), which chooses for a config whose RoPE differs by layer type (Gemma
        3: ``"sliding_attention"``, ``"full_attention"``) and is otherwise not needed."""
        params = getattr(config, "rope_parameters", None) or {}
        by_type = params and all(isinstance(p, dict) for p in params.values())
        if by_type:
            if layer_type not in params:
                raise ValueError(
                    f"layer_type: this config's RoPE differs by layer type; expected one of {sorted(params)}, "
                    f"got {layer_type!r}"
                )
            params = params[layer_type]
        else:
            layer_type = None  # (transformers' functions then read the one RoPE)
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        kind = params.get("rope_type", "default")
        if theta is None:
            raise ValueError("config: no rope_theta found (rope_parameters['rope_theta'] or rope_theta)")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layout = _layout(config)
        if kind == "default":
            factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
            dim = int(head_dim * factor)
            return cls(theta, None if dim == head_dim else dim, layout)
        if kind in SEQUENCE_DEPENDENT:
            raise ValueError(
                f"config: rope_type {kind!r} changes the frequencies with the sequence length; "
                "a fixed-size memory needs fixed ones"
            )
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if kind not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"config: rope_type {kind!r} is not one transformers knows")
        # (a cos/sin scale, yarn's, rotates with the key: un-rotating and rotating back leave it in place)
        kw = {} if layer_type is None else {"layer_type": layer_type}
        inverse_frequencies, _ = ROPE_INIT_FUNCTIONS[kind](config, None, **kw)
        frequencies = tuple(float(f) for f in inverse_frequencies.tolist())
        dim = 2 * len(frequencies)
        return cls(theta, None if dim == head_dim else dim, layout, frequencies)


def _layout(config: Any) -> str:
    """How the model of ``config`` pairs the rotated dimensions, read off its modeling code's ``rotate_half``
    (Llama's pairs i and i + dim/2; Cohere's, GLM's and ERNIE's pairs 2i and 2i + 1). "half" for a config
    that names no transformers model."""
    model_type = getattr(config, "model_type", None)
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except (ImportError, TypeError, ValueError):
        return "half"
    rotate_half = getattr(module, "rotate_half", None)
    if rotate_half is None:
        return "half"
    import torch

    turned = rotate_half(torch.arange(1.0, 5.0)).tolist()
    for layout, expected in (("half", [-3.0, -4.0, 1.0, 2.0]), ("interleaved", [-2.0, 1.0, -4.0, 3.0])):
        if turned == expected:
            return layout
    raise ValueError(f"config: the {model_type} model pairs its rotated dimensions in a way kvfold does not know")


# RoPE types whose frequencies depend on the sequence length.
SEQUENCE_DEPENDENT = ("dynamic", "longrope")


def _frequencies(values: Any) -> Tuple[float, ...]:
    """``values`` as a tuple of finite floats, or a TypeError/ValueError naming ``frequencies``."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"RoPE: frequencies must be a sequence of real numbers, got {type(values).__name__}")
    try:
        array = np.asarray(values)
    except Exception as error:  # (a tensor on another device, a ragged list)
        raise TypeError(f"RoPE: frequencies must be a sequence of real numbers, got {type(values).__name__}") from error
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        raise TypeError(
            "RoPE: frequencies must be a sequence of real numbers (one per rotated pair), got "
            f"{type(values).__name__} of shape {array.shape} and dtype {array.dtype}"
        )
    if array.size == 0:
        raise ValueError("RoPE: frequencies: expected one value per rotated pair, got none")
    array = array.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"RoPE: frequencies[{bad[0]}] must be finite, got {float(array[bad[0]])!r}")
    return tuple(float(f) for f in array)
