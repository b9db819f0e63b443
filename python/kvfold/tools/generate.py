"""``python -m kvfold generate``: SmolLM2 writing with a fixed-size memory, streamed as it goes."""

from __future__ import annotations

from typing import Optional

from .. import rules

RULE_HELP = (
    "drop | cumulative | moving:N | weighted:B1,B2,... | ema:ALPHA | compressive:SLOTS,RATE[,max] | "
    "full (transformers' growing cache, for comparison)"
)


def parse_rule(text: str) -> Optional[rules.Rule]:
    """A rule from its command-line spelling (see RULE_HELP); None for "full". ValueError if malformed."""
    name, _, args = text.strip().lower().partition(":")
    values = [a.strip() for a in args.split(",")] if args else []
    try:
        if name == "full" and not values:
            return None
        if name in ("drop", "cumulative") and not values:
            return rules.Drop() if name == "drop" else rules.Cumulative()
        if name == "moving" and len(values) == 1:
            return rules.Moving(int(values[0]))
        if name == "weighted" and values:
            return rules.Weighted(tuple(float(v) for v in values))
        if name == "ema" and len(values) == 1:
            return rules.EMA(float(values[0]))
        if name == "compressive" and len(values) in (2, 3):
            return rules.Compressive(int(values[0]), int(values[1]), *values[2:])
    except (TypeError, ValueError) as error:
        raise ValueError(f"rule: {text!r}: {error}") from None
    raise ValueError(f"rule: expected one of {RULE_HELP}, got {text!r}")


def run(
    prompt: str,
    rule: Optional[rules.Rule],
    window: int,
    sinks: int,
    max_new_tokens: int = 200,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    chat: bool = True,
) -> int:
    import torch
    from transformers import DynamicCache, TextStreamer

    from ..hf import FoldCache
    from . import smollm2

    model, tokenizer = smollm2.load()
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt")
    cache = DynamicCache() if rule is None else FoldCache(rule, window=window, sinks=sinks)
    torch.manual_seed(seed)
    options = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    model.generate(
        **inputs,
        cache=cache,
        max_new_tokens=max_new_tokens,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        pad_token_id=tokenizer.eos_token_id,
        **options,
    )
    layers = len(cache.layers)
    if rule is None:
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        note = "grows with every token"
    else:
        held = cache.nbytes
        note = f"fixed: {rule!r}, window {window}, sinks {sinks}"
    print(
        f"\n[cache: {held:,} bytes in {layers} layers ({held // max(layers, 1):,} per layer), {note}; "
        f"{cache.get_seq_length()} tokens seen]"
    )
    return 0
