"""FoldLayer: one layer of a FoldCache, a kvfold memory fed the layer's keys and values, read by the
model's own attention or by kvfold's (``_hf_attention``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

from . import rules
from ._hf_attention import pending
from ._hf_checks import check_summary_rule, takes
from .rope import RoPE

if TYPE_CHECKING:
    from .hf import FoldCache


def _as_float32(x: torch.Tensor) -> np.ndarray:
    """A float32 NumPy view of x (a copy only when the dtype or device requires one)."""
    return x.detach().to(device="cpu", dtype=torch.float32).numpy()


def _position_ids(args: Tuple[Any, ...], kwargs: Any) -> Optional[torch.Tensor]:
    """The model's position ids among the keywords a cache update gets (transformers passes the attention's
    keywords, ``position_ids`` among them, as ``kwargs=``; older versions a dict of cache keywords)."""
    for d in (kwargs.get("kwargs"), kwargs, *args):
        if isinstance(d, dict) and d.get("position_ids") is not None:
            return d["position_ids"]
    return None


# A recorded block: (tokens seen before it, state before it, queries or None, k, v, positions).
Recorded = Tuple[int, Any, Optional[np.ndarray], np.ndarray, np.ndarray, Optional[np.ndarray]]


def _check_causal(mask: Optional[torch.Tensor], T: int, sliding_window: Optional[int] = None) -> None:
    """kvfold's attention reads no mask: the block's own causal one, which a model with a sliding window
    narrows to its last ``sliding_window`` pairs (a window no longer than it reads no more). A mask that
    hides more (padding) is refused rather than ignored."""
    if mask is None:
        return
    allowed = mask if mask.dtype == torch.bool else mask == 0
    kv = allowed.shape[-1]
    ones = torch.ones(T, kv, dtype=torch.bool, device=allowed.device)
    expected = ones.tril(kv - T)
    if sliding_window is not None:
        expected &= ~ones.tril(kv - T - sliding_window)
    if allowed.dim() != 4 or allowed.shape[-2] != T or not torch.equal(allowed, expected.expand_as(allowed)):
        raise ValueError(
            "attention_mask: kvfold's attention takes the causal mask of a block and nothing more, got a mask that "
            "also hides pairs (padding); feed rows of equal length without padding, or load the model with "
            "attn_implementation='sdpa' or 'eager', where FoldCache streams padding like any token"
        )


# What a model's attention may ask of its attention function that kvfold's does not do: refused, not ignored.
UNAPPLIED = {
    "softcap": "logit soft-capping (Gemma 2)",
    "s_aux": "attention sinks (gpt-oss)",
    "sinks": "attention sinks",
    "position_bias": "relative position bias (T5)",
}


class FoldLayer(CacheLayerMixin):
    """One layer of ``cache`` (a ``FoldCache``), with its settings: a memory (``kvfold.MemoryCache`` unless
    the cache's ``memory`` says otherwise) made when the layer sees which attention reads its first block."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: FoldCache) -> None:
        super().__init__()
        self.rule, self.window, self.sinks = cache.rule, cache.window, cache.sinks
        self.storage_dtype, self.check_finite = cache.storage_dtype, cache.check_finite
        self.rope, self.retain, self.recent = cache.rope, cache.retain, cache.recent
        self.memory_class = cache.memory_class
        self.memory: Any = None
        self.attention: Optional[str] = None  # "kvfold" or "model", from the first block on
        self.seen = 0  # tokens fed, the same for every row
        self.record_past = False
        self.states_to_keep: Optional[int] = None  # tokens a crop may take back (None: any number)
        self._history: List[Recorded] = []  # per block, when recording
        # a block handed to the model, not yet in the memory: (k, v, positions)
        self._block: Optional[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = None
        self._shape: Tuple[int, int, int, int] = (0, 0, 0, 0)  # B, H, d_k, d_v

    def __repr__(self) -> str:
        return f"FoldLayer(rule={self.rule!r}, window={self.window}, sinks={self.sinks}, seen={self.seen})"

    # -- creation ----------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ValueError(
                f"key_states, value_states: expected (B, H, T, d) tensors, got shapes {tuple(key_states.shape)} "
                f"and {tuple(value_states.shape)}"
            )
        check_summary_rule(self.rule)
        batch, heads, _, head_dim = key_states.shape
        self._shape = (batch, heads, head_dim, value_states.shape[-1])
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def _make_memory(
        self,
        num_query_heads: Optional[int] = None,
        scale: Optional[float] = None,
        sliding_window: Optional[int] = None,
        module: Optional[torch.nn.Module] = None,
    ) -> None:
        """The layer's memory. Under a model's sliding window shorter than the cache's window (the local layers
        of Gemma 3) the model reads nothing older than that window: the layer keeps exactly it, a plain
        window of ``sliding_window`` pairs with nothing to fold. ``module``: the model's attention, when
        kvfold's runs (see ``_layer_rope``)."""
        B, H, dk, dv = self._shape
        exact = sliding_window is not None and self.window > sliding_window
        kw: Dict[str, Any] = dict(
            num_heads=H,
            head_dim=dk,
            value_dim=dv,
            num_query_heads=num_query_heads,
            batch_size=B,
            window=sliding_window if exact else self.window,
            sinks=0 if exact else self.sinks,
            scale=scale,
        )
        if takes(self.memory_class, "dtype"):
            kw.update(dtype=self.storage_dtype, check_finite=self.check_finite)
        rope = self._layer_rope(module)
        if rope is not None and not exact:
            kw["rope"] = rope
        if self.retain != "fifo" and not exact:
            kw.update(retain=self.retain, recent=self.recent)
        rule = rules.Drop() if exact else self.rule
        memory = self.memory_class(rule, **kw)
        check_summary_rule(rule, memory)
        self.memory = memory

    def _layer_rope(self, module: Optional[torch.nn.Module]) -> Optional[RoPE]:
        """The RoPE this layer folds with: none for keys the model leaves unrotated (SmolLM3's and Llama 4's
        NoPE layers, whose attention has ``use_rope`` false); with ``rope="model"`` the one of the layer's
        type (Gemma 3's local and global layers differ); else the cache's."""
        if self.rope is None or not getattr(module, "use_rope", True):
            return None
        if isinstance(self.rope, RoPE):
            return self.rope
        assert module is not None  # rope="model" under the model's own attention is refused in _settle
        config = module.config
        layer_types = getattr(config, "layer_types", None)
        return RoPE.from_config(config, None if layer_types is None else layer_types[module.layer_idx])

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, dk, dv = self._shape
        if key_states.dim() != 4 or (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != (B, H, dk):
            raise ValueError(f"key_states: expected shape (B={B}, H={H}, T, d_k={dk}), got {tuple(key_states.shape)}")
        if value_states.shape != (*key_states.shape[:3], dv):
            raise ValueError(
                f"value_states: expected shape ({B}, {H}, {key_states.shape[2]}, d_v={dv}), "
                f"got {tuple(value_states.shape)}"
            )
        if key_states.shape[2] == 0:
            raise ValueError(f"key_states: expected at least one token, got shape {tuple(key_states.shape)}")

    def _positions(self, position_ids: Optional[torch.Tensor], T: int) -> Optional[np.ndarray]:
        """The block's positions (B, T) for a memory with a RoPE; None without one."""
        if self.rope is None or position_ids is None:
            return None
        p = torch.as_tensor(position_ids).detach().cpu().to(torch.int64)
        return np.ascontiguousarray(p.expand(self._shape[0], T).numpy())

    # -- the update --------------------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """For the model's own attention: returns ``[visible set | new pairs]``, then folds the new pairs in.
        For kvfold's attention: returns the new pairs, which the attention function then hands to the memory.
        The first block of a layer goes the second way until the attention shows which one runs."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._settle()
        self._check(key_states, value_states)
        T = key_states.shape[2]
        positions = self._positions(_position_ids(args, kwargs), T)
        if self.attention == "model":
            return self._model_update(key_states, value_states, positions)
        k, v = _as_float32(key_states), _as_float32(value_states)
        if self.check_finite and not (np.isfinite(k).all() and np.isfinite(v).all()):
            raise ValueError("key_states, value_states: expected finite values, got NaN or Inf")
        self._block = (k, v, positions)
        pending.block = (self, key_states)
        self.seen += T
        return key_states, value_states

    def attend_block(
        self,
        query: torch.Tensor,
        scaling: Optional[float],
        attention_mask: Optional[torch.Tensor] = None,
        module: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """kvfold's attention over the block the last update handed out: (B, T, Hq, d_v). On any error the
        layer is as before the update (the memory validates everything before it takes the block).
        ``module`` and ``kwargs``: the model's attention module and what it passes its attention function
        (``sliding_window``; a layer without RoPE has ``use_rope`` false)."""
        assert self._block is not None
        k, v, positions = self._block
        self._block = None
        sliding_window = kwargs.get("sliding_window")
        try:
            for name, what in UNAPPLIED.items():
                value = kwargs.get(name)
                if value is not None:
                    shown = (
                        f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
                    )
                    raise ValueError(
                        f"{name}: kvfold's attention does not apply the model's {what}, got {name}={shown}; load "
                        "the model with attn_implementation='eager', where FoldCache gives the model its pairs"
                    )
            _check_causal(attention_mask, k.shape[2], sliding_window)
            if self.memory is None:
                self._make_memory(query.shape[1], scaling, sliding_window, module)
            q = _as_float32(query)
            before = self._snapshot() if self.record_past else None
            out = self.memory.forward(q, k, v, **({} if positions is None else {"positions": positions}))
        except Exception:
            self.seen -= k.shape[2]
            raise
        self.attention = "kvfold"
        if self.record_past:
            self._remember((self.seen - k.shape[2], before, q.copy(), k.copy(), v.copy(), positions))
        return torch.from_numpy(np.asarray(out, np.float32)).to(query.dtype).transpose(1, 2).contiguous()

    def _settle(self) -> None:
        """A block still held when the layer is next used was read by the model's own attention: fold it."""
        if self._block is None:
            return
        if self.attention == "kvfold":
            raise ValueError(
                "FoldCache: this layer's blocks went through kvfold's attention before, but the model's own attention "
                "read the last one; keep one attention implementation per cache"
            )
        if self.retain != "fifo":
            raise ValueError(
                f"retain={self.retain!r} keeps the pairs kvfold's attention weighs most: load the model with "
                "attn_implementation='kvfold' (import kvfold.hf first)"
            )
        if isinstance(self.rope, str):
            raise ValueError(
                "rope='model' takes each layer's RoPE from the model's attention, which only kvfold's attention "
                "shows: load the model with attn_implementation='kvfold' (import kvfold.hf first), or pass "
                "rope=RoPE.from_config(model.config)"
            )
        if getattr(self.rule, "bias", None) == "log_count":
            raise ValueError(
                f"rule: {self.rule!r} adds a logit bias to its slots, which only kvfold's attention applies: load "
                "the model with attn_implementation='kvfold' (import kvfold.hf first), or use bias=None"
            )
        k, v, positions = self._block
        self.attention = "model"
        if self.memory is None:
            self._make_memory()
        self._block = None
        self._fold(k, v, positions, self.seen - k.shape[2])

    def _fold(self, k: np.ndarray, v: np.ndarray, positions: Optional[np.ndarray], seen_before: int) -> None:
        before = self._snapshot() if self.record_past else None
        self.memory.update(k, v, **({} if positions is None else {"positions": positions}))
        if self.record_past:
            self._remember((seen_before, before, None, k.copy(), v.copy(), positions))

    def _remember(self, entry: Recorded) -> None:
        """Records a block, and forgets the blocks no crop can reach: one goes back at most
        ``recurrent_states_to_keep`` tokens (when transformers gives it), or into the newest block."""
        self._history.append(entry)
        if self.states_to_keep is None:
            return
        start = entry[0]
        reach = min(start, start + entry[3].shape[2] - self.states_to_keep)
        kept = [i for i, h in enumerate(self._history) if h[0] <= reach]
        del self._history[: kept[-1] if kept else 0]

    def _model_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: Optional[np.ndarray]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The visible set is written by the cache straight into the tensors handed to the model, next
        to the new pairs: one copy of each pair, the one the model's attention reads."""
        memory = self.memory
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
        self._fold(k, v, positions, self.seen)  # validates everything first: on error the state is unchanged
        self.seen += T
        keys[:, :, n:] = key_states
        values[:, :, n:] = value_states
        device, dtype = key_states.device, key_states.dtype
        return keys.to(device=device, dtype=dtype), values.to(device=device, dtype=dtype)

    def _snapshot(self) -> Any:
        return self.memory.checkpoint() if hasattr(self.memory, "checkpoint") else self.memory.copy()

    def _restore(self, snapshot: Any) -> None:
        if hasattr(self.memory, "rollback"):
            self.memory.rollback(snapshot)
        else:
            self.memory = snapshot.copy()

    # -- what the masks and the generation loop ask --------------------------------------------

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        """(kv_length, kv_offset): the visible pairs stand at the positions just before the block, so the
        causal mask lets every query see all of them and the block's pairs up to itself. (kvfold's attention
        reads no mask: it is the block's own.)"""
        self._settle()
        visible = self.memory.visible_size if self.memory is not None and self.attention == "model" else 0
        return visible + query_length, self.seen - visible

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1  # any number of tokens; the memory never grows

    @property
    def batch_size(self) -> int:
        if not self.is_initialized:
            raise AttributeError("batch_size")
        self._settle()
        return int(self.memory.batch_size if self.memory is not None else self._shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes this layer's memory holds (0 before the first update)."""
        self._settle()
        return int(getattr(self.memory, "nbytes", 0))

    def reset(self) -> None:
        """Back to a fresh layer: the next block may have another batch size or attention."""
        self.memory, self.attention, self.is_initialized = None, None, False
        self.seen, self._history, self._block, self._shape = 0, [], None, (0, 0, 0, 0)

    def offload(self) -> None:  # the memory lives in host RAM already
        pass

    def prefetch(self) -> None:
        pass

    # -- rows: beam search and batch selection --------------------------------------------------

    def _reorder(self, indices: Any) -> None:
        """New row r is old row indices[r] (rows may repeat; the batch size becomes len(indices))."""
        self._settle()
        order = np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64)
        if self.memory is not None:
            self.memory.reorder(order)
            self._history = []
        self._shape = (len(order), *self._shape[1:])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reorder(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._reorder(np.repeat(np.arange(self.batch_size), repeats))

    # -- rolling back -----------------------------------------------------------------------------

    @property
    def is_croppable(self) -> bool:
        return self.record_past

    def activate_past_recording(self, recurrent_states_to_keep: Optional[int] = None, **kwargs: Any) -> None:
        """Keep a checkpoint before each update (a copy of the state) so that ``crop`` can take tokens back:
        ``recurrent_states_to_keep`` tokens (transformers' option for recurrent layers) or into the newest
        block; any number when it is None."""
        self.record_past = True
        self.states_to_keep = recurrent_states_to_keep

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last ``-tokens_to_remove`` tokens (a positive value is the length to keep).

        Folding cannot be undone, so this works only back to a checkpoint recorded after
        ``activate_past_recording``; ``crop(0)`` forgets the recorded history."""
        self._settle()
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
        seen, before, q, k, v, positions = starts[-1]
        self._restore(before)
        n = target - seen
        if n > 0:  # the kept part of that block, fed again as it was (with its queries under kvfold's attention)
            p = {} if positions is None else {"positions": positions[:, :n]}
            if q is None:
                self.memory.update(k[:, :, :n], v[:, :, :n], **p)
            else:
                self.memory.forward(q[:, :, :n], k[:, :, :n], v[:, :, :n], **p)
        self.seen = target
        self._history = [h for h in self._history if h[0] <= seen]
