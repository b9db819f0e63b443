"""The transformers attention ``"kvfold"`` (registered on import): a FoldCache layer's block is attended by
its kvfold memory, anything else by ``sdpa``."""

from __future__ import annotations

import threading
from typing import Any, Optional, Tuple

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

# The block a layer's update handed to the model and that kvfold's attention should take next: a layer
# and the key tensor it returned (the attention function receives that very tensor).
pending = threading.local()


def kvfold_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """transformers attention ``"kvfold"``: a FoldCache layer's block is attended by its kvfold memory
    (``forward`` over the block's queries, keys, values and positions); anything else goes to ``sdpa``."""
    layer, returned = getattr(pending, "block", (None, None))
    if layer is None or returned is not key:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    pending.block = (None, None)
    return layer.attend_block(query, scaling, attention_mask, module, **kwargs), None


AttentionInterface.register("kvfold", kvfold_attention)
AttentionMaskInterface.register("kvfold", sdpa_mask)  # the sdpa fallback's mask; a FoldCache block needs none
