"""``python -m kvfold generate``: SmolLM2 writing with a fixed-size memory, streamed as it goes."""

from __future__ import annotations

from dataclasses import MISSING, Field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import rules


def _optional_str(text: str) -> Optional[str]:
    return None if text == "none" else text


# How the command line spells a rule's parameters, by the type its dataclass declares. A rule whose every
# parameter is spelled here (and that keeps key/value slots, as a model's attention reads) is a choice.
_VALUES: Dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "Optional[str]": _optional_str}
_SEQUENCE = "Tuple[float, ...]"  # the last parameter: every value left


def _command_line_rules() -> Dict[str, Tuple[Callable[..., rules.Rule], List["Field[Any]"]]]:
    spelled: Dict[str, Tuple[Callable[..., rules.Rule], List["Field[Any]"]]] = {}
    for kind, cls in rules.kinds().items():
        params = list(fields(cls))
        if not cls.matrix and all(f.type in _VALUES or (f.type == _SEQUENCE and f is params[-1]) for f in params):
            spelled[kind] = (cls, params)
    return spelled


def _required(params: List["Field[Any]"]) -> int:
    return sum(1 for f in params if f.default is MISSING and f.default_factory is MISSING)


def _spelling(kind: str, params: List["Field[Any]"]) -> str:
    """``kind:A,B[,C]``: the parameters in order, upper case, the optional ones in brackets."""
    if not params:
        return kind
    names = [f.name.upper() + (",..." if f.type == _SEQUENCE else "") for f in params]
    required = _required(params)
    return f"{kind}:" + ",".join(names[:required]) + "".join(f"[,{n}]" for n in names[required:])


RULES = _command_line_rules()
RULE_HELP = " | ".join(_spelling(kind, params) for kind, (_, params) in RULES.items()) + (
    " | full (transformers' growing cache, for comparison)"
)


def parse_rule(text: str) -> Optional[rules.Rule]:
    """A rule from its command-line spelling (see RULE_HELP); None for "full". ValueError if malformed."""
    name, _, args = text.strip().lower().partition(":")
    values = [a.strip() for a in args.split(",")] if args else []
    if name == "full" and not values:
        return None
    if name in RULES:
        cls, params = RULES[name]
        required = _required(params)
        sequence = bool(params) and params[-1].type == _SEQUENCE
        if required <= len(values) and (sequence or len(values) <= len(params)):
            try:
                if sequence:
                    last = tuple(float(v) for v in values[len(params) - 1 :])
                    return cls(*(_VALUES[str(f.type)](v) for f, v in zip(params[:-1], values)), last)
                return cls(*(_VALUES[str(f.type)](v) for f, v in zip(params, values)))
            except (TypeError, ValueError) as error:
                raise ValueError(f"rule: {text!r}: {error}") from None
    raise ValueError(f"rule: expected one of {RULE_HELP}, got {text!r}")


# A fixed memory's retention when none is named: with Merge slots, the best memory `kvfold eval` measures.
DEFAULT_RETAIN = "tova"


def memory(
    rule: Optional[rules.Rule],
    window: int,
    sinks: int,
    rope: bool = True,
    retain: Optional[str] = None,
    recent: Optional[int] = None,
    dtype: str = "float32",
    config: Any = None,
) -> Any:
    """The cache ``run`` writes with: a FoldCache, or transformers' DynamicCache for ``rule=None``.

    ``retain`` None is DEFAULT_RETAIN; ``dtype`` is how the FoldCache stores its pairs. With ``rope`` the
    FoldCache folds keys un-rotated and reads its slots rotated, with the RoPE of ``config`` (the model's);
    without a config it is made without one, so that the options are checked before a model loads.
    ValueError or TypeError, naming the option, for a memory that cannot be."""
    from transformers import DynamicCache

    from ..hf import FoldCache
    from ..rope import RoPE

    if rule is None:
        for name, value in (("retain", retain), ("recent", recent)):
            if value is not None:
                raise ValueError(f"{name}: the full cache keeps every pair and folds none, got {name}={value!r}")
        if dtype != "float32":
            raise ValueError(f"dtype: the full cache keeps the model's own tensors, got dtype={dtype!r}")
        return DynamicCache()
    position = RoPE.from_config(config) if rope and config is not None else None
    retain = DEFAULT_RETAIN if retain is None else retain
    return FoldCache(rule, window=window, sinks=sinks, dtype=dtype, rope=position, retain=retain, recent=recent)


def describe(cache: Any) -> str:
    """The memory ``memory`` made, in words, for the line after the text."""
    from ..hf import FoldCache

    if not isinstance(cache, FoldCache):
        return "grows with every token"
    text = f"fixed: {cache.rule!r}, window {cache.window}, sinks {cache.sinks}, {cache.storage_dtype}"
    text += "" if cache.rope is None else ", RoPE-aware folding"
    return text + f", retain {cache.retain}" + ("" if cache.recent is None else f" (recent {cache.recent})")


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
    rope: bool = True,
    retain: Optional[str] = None,
    recent: Optional[int] = None,
    dtype: str = "float32",
) -> int:
    """SmolLM2 answers ``prompt`` with the memory of ``memory(rule, window, sinks, rope, retain, recent, dtype)``,
    streaming the text, then prints the cache's bytes. The model's attention runs through kvfold, which
    reads every memory as it is (slot biases, RoPE-aware slots, retention by attention weight)."""
    import torch
    from transformers import TextStreamer

    from . import smollm2

    memory(rule, window, sinks, rope, retain, recent, dtype)  # a bad memory fails before the model loads
    model, tokenizer = smollm2.load()
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt")
    cache = memory(rule, window, sinks, rope, retain, recent, dtype, config=model.config)
    torch.manual_seed(seed)
    options = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    with smollm2.kvfold_attention(model):
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
    else:
        held = cache.nbytes
    print(
        f"\n[cache: {held:,} bytes in {layers} layers ({held // max(layers, 1):,} per layer), "
        f"{describe(cache)}; {cache.get_seq_length()} tokens seen]"
    )
    return 0
