"""A Hugging Face transformers cache backed by kvfold: ``FoldCache``.

``model.generate(ids, cache=FoldCache(rules.Cumulative(), window=60, sinks=4))`` (or
``past_key_values=``) runs a Llama-family model with a fixed-size attention memory per layer: one
``kvfold.MemoryCache`` per layer, made from the shapes of the layer's first keys and values.

Attention runs one of two ways, whichever the model uses (each layer finds out at its first block):

- **The model's own attention** (``sdpa``, ``eager``): a block of T new tokens (a prompt, a chunk, or one
  decoded token) attends to the visible set as it stood before the block, ``[sinks | memory slots |
  window]``, plus the block's own pairs under a causal mask; then the block is folded into the memory in
  order (segment-level recurrence).
- **kvfold's attention** (a model loaded with ``attn_implementation="kvfold"``, registered when this module
  is imported): the layer hands the block's queries, keys and values, with the model's positions, to the
  memory's ``forward``, token by token: each token is placed (and a pair folded) before its query reads
  ``[sinks | memory slots | window]``, so a token sees itself inside the window. This path applies what the
  model's attention cannot: slot logit biases (``rules.Merge(bias="log_count")``) and retention chosen by
  the attention weights (``retain="tova"`` or ``"h2o"``). A layer under a model sliding window shorter than
  ``window`` (Gemma 3's local layers) keeps exactly that window: the model reads nothing older there. With
  any other cache the ``kvfold`` attention is ``sdpa``.

Keys are kept as the model gave them, rotated at their original positions; with ``rope=`` the memory
un-rotates a pair as it folds it and rotates a slot back at the slot's position (``kvfold.RoPE``,
``RoPE.from_config(model.config)``).

Needs torch and transformers (``pip install kvfold[hf]``); the rest of kvfold does not.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from transformers.cache_utils import Cache

from . import MemoryCache, rules
from ._checks import integer
from ._core import MAX_WINDOW
from ._hf_attention import kvfold_attention
from ._hf_checks import check_summary_rule, storage_dtype, takes
from ._hf_layer import FoldLayer
from .reference import RETAIN
from .rope import RoPE

__all__ = ["FoldCache", "FoldLayer", "kvfold_attention"]


class FoldCache(Cache):
    """A transformers ``Cache`` whose every layer is a fixed-size kvfold memory.

    ``rule`` folds the pairs pushed out of the window (``None`` means ``rules.Drop()``: a sliding window,
    StreamingLLM with ``sinks``); ``window`` recent pairs and the first ``sinks`` pairs are kept exactly.
    ``dtype`` is how sinks, window and memory slots are stored ("float32", "float16", "bfloat16", "int8" or a
    torch dtype).
    Only summary rules: their slots are key/value pairs the model's softmax attention reads.

    ``rope`` (``kvfold.RoPE``, e.g. ``RoPE.from_config(model.config)``): fold pairs un-rotated and read each
    slot rotated at its position, with the model's positions; ``"model"``: each layer with the RoPE its
    attention applies (by layer type, none for a layer without RoPE), which kvfold's attention reads off
    the model. ``retain`` (``"fifo"``, ``"tova"``, ``"h2o"``
    with ``recent``): which window pair is folded when the window is full; the attention-chosen ones, like a
    Merge rule's log-count bias, need a model loaded with ``attn_implementation="kvfold"``.
    ``memory``: the class each layer's memory is made with, ``kvfold.MemoryCache`` by default (every
    retention and RoPE, in C++), or ``kvfold.reference.StreamCache`` (the NumPy model it follows, in
    float64, slowly).
    """

    def __init__(
        self,
        rule: Optional[rules.Rule] = None,
        window: int = 0,
        sinks: int = 0,
        dtype: Any = "float32",
        check_finite: bool = True,
        rope: Union[RoPE, str, None] = None,
        retain: str = "fifo",
        recent: Optional[int] = None,
        memory: Any = None,
    ) -> None:
        rule = rules.Drop() if rule is None else rule
        if not isinstance(rule, rules.Rule):
            raise TypeError(f"rule: expected a kvfold.rules rule (e.g. rules.Cumulative()), got {type(rule).__name__}")
        check_summary_rule(rule)
        self.rule = rule
        self.window, self.sinks = integer("window", window, 0, MAX_WINDOW), integer("sinks", sinks, 0, MAX_WINDOW)
        self.storage_dtype = storage_dtype(dtype)
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite: expected True or False, got {type(check_finite).__name__}")
        self.check_finite = check_finite
        self.memory_class = MemoryCache if memory is None else memory
        if not callable(self.memory_class):
            raise TypeError(f"memory: expected a memory class such as kvfold.MemoryCache, got {type(memory).__name__}")
        if rope is not None and not isinstance(rope, (RoPE, str)):
            raise TypeError(f"rope: expected a kvfold.RoPE, 'model' or None, got {type(rope).__name__}")
        if isinstance(rope, str) and rope != "model":
            raise ValueError(f"rope: expected a kvfold.RoPE, 'model' or None, got {rope!r}")
        if retain not in RETAIN:
            raise ValueError(f"retain: expected one of {', '.join(map(repr, RETAIN))}, got {retain!r}")
        for name, wanted in (("rope", rope is not None), ("retain", retain != "fifo")):
            if wanted and not takes(self.memory_class, name):
                raise ValueError(
                    f"{name}: {getattr(self.memory_class, '__name__', self.memory_class)} takes no {name}; "
                    "kvfold.MemoryCache (the default) and kvfold.reference.StreamCache do"
                )
        if recent is not None and retain != "h2o":
            raise ValueError(
                f"recent: only retain='h2o' keeps a recent part, got recent={recent} with retain={retain!r}"
            )
        if recent is not None and not 0 <= integer("recent", recent) <= self.window:
            raise ValueError(f"recent: expected an integer in [0, window={self.window}], got {recent}")
        if self.storage_dtype != "float32" and not takes(self.memory_class, "dtype"):
            raise ValueError(
                f"dtype: {getattr(self.memory_class, '__name__', 'memory')} computes in float64 and "
                f"stores nothing in {self.storage_dtype}"
            )
        self.rope, self.retain, self.recent = rope, retain, recent
        self._record_past = False
        self._record_options: Dict[str, Any] = {}
        super().__init__(layers=[])

    def __repr__(self) -> str:
        extra = "" if self.rope is None else f", rope={self.rope!r}"
        extra += "" if self.retain == "fifo" else f", retain={self.retain!r}"
        return (
            f"FoldCache(rule={self.rule!r}, window={self.window}, sinks={self.sinks}, dtype={self.storage_dtype!r}"
            f"{extra}, layers={len(self.layers)}, seen={self.get_seq_length()})"
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            layer = FoldLayer(self)
            if self._record_past:
                layer.activate_past_recording(**self._record_options)
            self.layers.append(layer)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def activate_past_recording(self, **kwargs: Any) -> None:
        """Record a checkpoint before each update so that ``crop`` can take tokens back. transformers'
        options for recurrent layers (``recurrent_states_to_keep``) are passed on to the layers."""
        self._record_past, self._record_options = True, kwargs
        super().activate_past_recording(**kwargs)

    @property
    def is_croppable(self) -> bool:
        return self._record_past and all(layer.is_croppable for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' memories; fixed once every layer has seen a token."""
        return sum(layer.nbytes for layer in self.layers)
