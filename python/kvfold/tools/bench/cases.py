"""The cases a benchmark times, and the data it feeds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from ... import rules


@dataclass(frozen=True)
class Case:
    """One benchmark: a memory configuration and what is timed (B = 1, query heads = KV heads)."""

    name: str
    rule: rules.Rule
    window: int = 0
    sinks: int = 0
    tokens: int = 1  # 1: one decode step; T > 1: a prefill of T tokens from an empty cache
    dtype: str = "float32"
    heads: int = 32
    head_dim: int = 128
    gates: bool = False  # matrix rules: per-token decay and/or beta, one per head (as gated delta layers make them)

    @property
    def prefill(self) -> bool:
        return self.tokens > 1

    @property
    def matrix(self) -> bool:
        return isinstance(self.rule, MATRIX_RULES)


MATRIX_RULES = (rules.Linear, rules.Gated, rules.Delta, rules.GatedDelta)


CASES: List[Case] = [
    Case("decode EMA, window 0", rules.EMA(0.1)),
    Case("decode Cumulative, window 0", rules.Cumulative()),
    Case("decode W256+S4+Cumulative", rules.Cumulative(), window=256, sinks=4),
    Case("decode W256+S4+Cumulative f16", rules.Cumulative(), window=256, sinks=4, dtype="float16"),
    Case("decode W256+S4+Cumulative bf16", rules.Cumulative(), window=256, sinks=4, dtype="bfloat16"),
    Case("decode W256+S4+Cumulative int8", rules.Cumulative(), window=256, sinks=4, dtype="int8"),
    Case("decode W4096+S4 (Drop)", rules.Drop(), window=4096, sinks=4),
    Case("decode W4096+S4 (Drop) f16", rules.Drop(), window=4096, sinks=4, dtype="float16"),
    Case("decode W4096+S4 (Drop) int8", rules.Drop(), window=4096, sinks=4, dtype="int8"),
    Case("prefill T512 W256+S4+Cumulative", rules.Cumulative(), window=256, sinks=4, tokens=512),
    Case("prefill T2048 W256+S4+Cumulative", rules.Cumulative(), window=256, sinks=4, tokens=2048),
    Case("tiny decode EMA H1 d8", rules.EMA(0.1), heads=1, head_dim=8),
    Case("tiny decode W16 H1 d8", rules.Cumulative(), window=16, heads=1, head_dim=8),
    Case("decode Linear", rules.Linear()),
    Case("decode GatedDelta", rules.GatedDelta(), gates=True),
    Case("prefill T512 Linear", rules.Linear(), tokens=512),
    Case("prefill T2048 Linear", rules.Linear(), tokens=2048),
    Case("prefill T512 GatedDelta", rules.GatedDelta(), tokens=512, gates=True),
    Case("prefill T2048 GatedDelta", rules.GatedDelta(), tokens=2048, gates=True),
]


def make_data(case: Case, seed: int = 0) -> Dict[str, np.ndarray]:
    """Tokens for a case: q, k, v of shape (T, H, d), float32, the same for every implementation;
    for matrix rules unit-length keys (as the delta rules want them) and, with ``gates``, decay and
    beta of shape (T, H)."""
    rng = np.random.default_rng(seed)
    T = max(case.tokens, 1)
    data = {name: rng.standard_normal((T, case.heads, case.head_dim), dtype=np.float32) for name in ("q", "k", "v")}
    if case.matrix:
        data["k"] /= np.linalg.norm(data["k"], axis=-1, keepdims=True)
    if case.gates:
        decay = -rng.uniform(0.01, 0.5, (T, case.heads)).astype(np.float32)
        beta = rng.uniform(0.01, 0.99, (T, case.heads)).astype(np.float32)
        if isinstance(case.rule, (rules.Gated, rules.GatedDelta)):
            data["decay"] = decay
        if isinstance(case.rule, (rules.Delta, rules.GatedDelta)):
            data["beta"] = beta
    return data


GATES = ("decay", "beta")


def split_gates(data: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(q, k, v) and the per-token gates of a case's data."""
    return ({n: x for n, x in data.items() if n not in GATES}, {n: x for n, x in data.items() if n in GATES})


def fill_tokens(case: Case) -> int:
    """Tokens fed before a decode step is timed: sinks and window full, memory folded into."""
    return case.sinks + case.window + 3


def feed(memory: Any, data: Dict[str, np.ndarray], convert: Callable[[np.ndarray], Any] = lambda x: x) -> None:
    """Places every token of ``data`` ((T, H, d) arrays, (T, H) gates) into ``memory``, in order: one
    ``extend`` call when the memory has one (a long window then costs one copy, not one per token),
    else one ``update`` per token."""
    tokens, gates = split_gates(data)
    if hasattr(memory, "extend"):
        memory.extend(convert(tokens["k"]), convert(tokens["v"]), **{n: convert(g) for n, g in gates.items()})
        return
    for t in range(len(tokens["k"])):
        memory.update(convert(tokens["k"][t]), convert(tokens["v"][t]), **{n: convert(g[t]) for n, g in gates.items()})


def repeat_first(data: Dict[str, np.ndarray], count: int) -> Dict[str, np.ndarray]:
    """``count`` copies of the first token of ``data``: the filler before a timed decode step."""
    return {n: np.repeat(x[:1], count, axis=0) for n, x in data.items()}
