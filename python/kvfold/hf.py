"""A Hugging Face transformers cache backed by kvfold: ``FoldCache``.

``model.generate(ids, cache=FoldCache(rules.Cumulative(), window=60, sinks=4))`` (or
``past_key_values=``) runs a Llama-family model with a fixed-size attention memory per layer: one
``kvfold.MemoryCache`` per layer, made on the layer's first update from the shapes of its keys and values.

A block of T new tokens (a prompt, a chunk, or one decoded token) attends to the visible set as it
stood before the block, ``[sinks | memory slots | window]``, plus the block's own pairs under a causal
mask; then the block is folded into the memory in order (segment-level recurrence). Keys are kept as the
model gave them, after the rotary embedding at their original positions.

Needs torch and transformers (``pip install kvfold[hf]``); the rest of kvfold does not.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import MemoryCache, rules
from ._checks import integer

__all__ = ["FoldCache", "FoldLayer"]

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _storage_dtype(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        return _DTYPES[dtype]
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype: expected 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    return dtype


def check_summary_rule(rule: rules.Rule, cache: Optional[MemoryCache] = None) -> None:
    """ValueError unless ``rule`` keeps key/value slots that softmax attention can read."""
    if rule.matrix or (cache is not None and cache.matrix_memory):
        raise ValueError(
            f"rule: FoldCache needs a summary rule (Drop, Cumulative, Moving, Weighted, EMA, Compressive or another "
            f"rule with key/value slots), got {type(rule).__name__}, whose memory is a d_k x d_v matrix read "
            "linearly; the model's softmax attention reads only key/value pairs"
        )
    if getattr(rule, "bias", None) == "log_count":
        raise ValueError(
            f"rule: {rule!r} adds a logit bias to its slots, which the model's own attention cannot apply to the "
            "pairs FoldCache hands it; use bias=None"
        )


def _as_float32(x: torch.Tensor) -> np.ndarray:
    """A float32 NumPy view of x (a copy only when the dtype or device requires one)."""
    return x.detach().to(device="cpu", dtype=torch.float32).numpy()


class FoldLayer(CacheLayerMixin):
    """One layer's cache: a ``kvfold.MemoryCache`` made on the first update."""

    is_sliding = False
    is_compileable = False

    def __init__(self, rule: rules.Rule, window: int, sinks: int, dtype: str, check_finite: bool = True) -> None:
        super().__init__()
        self.rule, self.window, self.sinks, self.storage_dtype = rule, window, sinks, dtype
        self.check_finite = check_finite
        self.memory: Optional[MemoryCache] = None
        self.seen = 0  # tokens fed, the same for every row
        self.record_past = False
        self._history: List[Tuple[int, Any, np.ndarray, np.ndarray]] = []  # (seen, checkpoint, k, v) per update

    def __repr__(self) -> str:
        return f"FoldLayer(rule={self.rule!r}, window={self.window}, sinks={self.sinks}, seen={self.seen})"

    # -- creation and the update ---------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ValueError(
                f"key_states, value_states: expected (B, H, T, d) tensors, got shapes {tuple(key_states.shape)} "
                f"and {tuple(value_states.shape)}"
            )
        batch, heads, _, head_dim = key_states.shape
        memory = MemoryCache(
            self.rule,
            num_heads=heads,
            head_dim=head_dim,
            value_dim=value_states.shape[-1],
            batch_size=batch,
            window=self.window,
            sinks=self.sinks,
            dtype=self.storage_dtype,
            check_finite=self.check_finite,
        )
        check_summary_rule(self.rule, memory)
        self.memory, self.device, self.dtype = memory, key_states.device, key_states.dtype
        self.is_initialized = True

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        m = self.memory
        assert m is not None
        want = (m.batch_size, m.num_heads, m.head_dim)
        if key_states.dim() != 4 or (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != want:
            raise ValueError(
                f"key_states: expected shape (B={want[0]}, H={want[1]}, T, d_k={want[2]}), "
                f"got {tuple(key_states.shape)}"
            )
        if value_states.shape != (*key_states.shape[:3], m.value_dim):
            raise ValueError(
                f"value_states: expected shape ({want[0]}, {want[1]}, {key_states.shape[2]}, d_v={m.value_dim}), "
                f"got {tuple(value_states.shape)}"
            )
        if key_states.shape[2] == 0:
            raise ValueError(f"key_states: expected at least one token, got shape {tuple(key_states.shape)}")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``[visible set | new pairs]`` for the model's attention, then folds the new pairs in.

        The visible set is written by the cache straight into the tensors handed to the model, next
        to the new pairs: one copy of each pair, the one the model's attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        memory = self.memory
        assert memory is not None
        (B, H, T, dk), dv = key_states.shape, value_states.shape[-1]
        n = memory.visible_size
        keys = torch.empty((B, H, n + T, dk), dtype=torch.float32)
        values = torch.empty((B, H, n + T, dv), dtype=torch.float32)
        _, _, mask = memory.visible(out=(keys.numpy(), values.numpy()))
        if not mask[:, :n].all():
            raise ValueError(
                f"FoldCache: rows of the batch see different numbers of pairs ({mask.sum(axis=1).tolist()}); a "
                "transformers attention mask cannot express that, so every row must have seen the same tokens"
            )
        k, v = _as_float32(key_states), _as_float32(value_states)
        checkpoint = memory.checkpoint() if self.record_past else None
        memory.update(k, v)  # validates everything first: on error the state is unchanged
        if checkpoint is not None:
            self._history.append((self.seen, checkpoint, k.copy(), v.copy()))
        self.seen += T
        keys[:, :, n:] = key_states
        values[:, :, n:] = value_states
        device, dtype = key_states.device, key_states.dtype
        return keys.to(device=device, dtype=dtype), values.to(device=device, dtype=dtype)

    # -- what the masks and the generation loop ask --------------------------------------------

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        """(kv_length, kv_offset): the visible pairs stand at the positions just before the block, so the
        causal mask lets every query see all of them and the block's pairs up to itself."""
        visible = self.memory.visible_size if self.memory is not None else 0
        return visible + query_length, self.seen - visible

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1  # any number of tokens; the memory never grows

    @property
    def batch_size(self) -> int:
        if self.memory is None:
            raise AttributeError("batch_size")
        return self.memory.batch_size

    @property
    def nbytes(self) -> int:
        """Bytes this layer's memory holds (0 before the first update)."""
        return 0 if self.memory is None else self.memory.nbytes

    def reset(self) -> None:
        if self.memory is not None:
            self.memory.reset()
        self.seen, self._history = 0, []

    def offload(self) -> None:  # the memory lives in host RAM already
        pass

    def prefetch(self) -> None:
        pass

    # -- rows: beam search and batch selection --------------------------------------------------

    def _reorder(self, indices: Any) -> None:
        """New row r is old row indices[r] (rows may repeat; the batch size becomes len(indices))."""
        if self.memory is not None:
            self.memory.reorder(np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64))
            self._history = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reorder(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.memory is not None:
            self._reorder(np.repeat(np.arange(self.memory.batch_size), repeats))

    # -- rolling back -----------------------------------------------------------------------------

    @property
    def is_croppable(self) -> bool:
        return self.record_past

    def activate_past_recording(self) -> None:
        """Keep a checkpoint before each update (a copy of the state) so that ``crop`` can take tokens back."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last ``-tokens_to_remove`` tokens (a positive value is the length to keep).

        Folding cannot be undone, so this works only back to a checkpoint recorded after
        ``activate_past_recording``; ``crop(0)`` forgets the recorded history."""
        if tokens_to_remove == 0:
            self._history = []
            return
        target = self.seen + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, self.seen)
        if target == self.seen:
            return
        starts = [h for h in self._history if h[0] <= target]
        if target < 0 or not starts:
            raise ValueError(
                f"crop: cannot remove {self.seen - target} of {self.seen} tokens: kvfold folds tokens into a memory "
                "and a fold cannot be undone"
                + ("" if self.record_past else "; activate_past_recording() records checkpoints to roll back to")
            )
        seen, checkpoint, k, v = starts[-1]
        assert self.memory is not None
        self.memory.rollback(checkpoint)
        if target > seen:
            self.memory.update(k[:, :, : target - seen], v[:, :, : target - seen])
        self.seen = target
        self._history = [h for h in self._history if h[0] <= seen]


class FoldCache(Cache):
    """A transformers ``Cache`` whose every layer is a fixed-size kvfold memory.

    ``rule`` folds the pairs pushed out of the window (``None`` means ``rules.Drop()``: a sliding window,
    StreamingLLM with ``sinks``); ``window`` recent pairs and the first ``sinks`` pairs are kept exactly.
    ``dtype`` is how sinks, window and memory slots are stored ("float32", "float16", "bfloat16" or a torch dtype).
    Only summary rules: their slots are key/value pairs the model's softmax attention reads.
    """

    def __init__(
        self,
        rule: Optional[rules.Rule] = None,
        window: int = 0,
        sinks: int = 0,
        dtype: Any = "float32",
        check_finite: bool = True,
    ) -> None:
        rule = rules.Drop() if rule is None else rule
        if not isinstance(rule, rules.Rule):
            raise TypeError(f"rule: expected a kvfold.rules rule (e.g. rules.Cumulative()), got {type(rule).__name__}")
        check_summary_rule(rule)
        self.rule, self.window, self.sinks = rule, integer("window", window, 0), integer("sinks", sinks, 0)
        self.storage_dtype = _storage_dtype(dtype)
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite: expected True or False, got {type(check_finite).__name__}")
        self.check_finite = check_finite
        self._record_past = False
        super().__init__(layers=[])

    def __repr__(self) -> str:
        return (
            f"FoldCache(rule={self.rule!r}, window={self.window}, sinks={self.sinks}, dtype={self.storage_dtype!r}, "
            f"layers={len(self.layers)}, seen={self.get_seq_length()})"
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            layer = FoldLayer(self.rule, self.window, self.sinks, self.storage_dtype, self.check_finite)
            if self._record_past:
                layer.activate_past_recording()
            self.layers.append(layer)
        return self.layers[layer_idx].update(key_states, value_states)

    def activate_past_recording(self) -> None:
        """Record a checkpoint before each update so that ``crop`` can take tokens back."""
        self._record_past = True
        super().activate_past_recording()

    @property
    def is_croppable(self) -> bool:
        return self._record_past and all(layer.is_croppable for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' memories; fixed once every layer has seen a token."""
        return sum(layer.nbytes for layer in self.layers)
