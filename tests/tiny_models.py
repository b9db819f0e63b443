"""Tiny randomly initialized transformers models (no download), for the tests of kvfold.hf: import it
after ``pytest.importorskip("torch")`` and ``("transformers")``."""

import torch
import transformers

VOCAB = 101


def tiny(family="Llama", attention=None, seed=0, scale=4.0, **config):
    """A two-layer ``family`` model (Llama, Qwen2, Mistral): 6 query heads over 2 KV heads of 8 dims.
    ``attention`` is its attn_implementation (None: the default); ``scale`` multiplies the weight
    matrices, larger than the default init so that attention is far from uniform (1: as initialized)."""
    if attention is not None:
        config["attn_implementation"] = attention
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **config,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    if scale != 1:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale if p.dim() > 1 else 1.0)
    return model


def token_ids(length):
    """Two rows of ``length`` random token ids, the same every call."""
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(7))


def run(model, ids, cache, chunk):
    """Logits of the whole sequence fed in blocks of ``chunk`` tokens (0: all at once)."""
    chunk = chunk or ids.shape[1]
    with torch.no_grad():
        return torch.cat([model(ids[:, i : i + chunk], cache=cache).logits for i in range(0, ids.shape[1], chunk)], 1)
