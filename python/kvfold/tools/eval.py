"""``python -m kvfold eval``: what each memory keeps of the full cache's quality, on a real model.

Teacher-forced streaming of real text (CPython's bundled documentation, or any UTF-8 file) through
SmolLM2-135M-Instruct, with a grid of memories at equal budgets of pairs: each memory holds ``budget``
pairs (sinks + summary slots + window) per layer and KV head. The model runs with kvfold's attention
(``attn_implementation="kvfold"``), so every memory is read token by token whatever the block size: a
token's pair is placed (and one pair folded) before its query reads the memory, and the token sees the
``budget`` pairs held, itself among them. All memories run in lockstep over the same blocks and are
compared with the full cache (transformers' DynamicCache) on exactly the same inputs.

The text is cut into ``segments`` consecutive pieces of ``tokens`` tokens, each streamed from an empty
cache. Per memory and segment: perplexity of the next token, mean KL(full || memory) over the next-token
distributions, and top-1 agreement with the full cache; the table gives the mean over segments and
their range.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import MemoryCache, rules

# The memory class each layer's memory is made with (kvfold.reference.StreamCache, the NumPy model,
# gives the same results in float64, slowly).
MEMORY: Any = MemoryCache


@dataclass(frozen=True)
class Memory:
    name: str
    kind: str  # the memory without its budget, for the plot's legend
    rule: Optional[rules.Rule]  # None: the full cache (transformers' DynamicCache)
    window: int = 0
    sinks: int = 0
    rope: bool = False  # fold un-rotated keys, read slots rotated at their positions (the model's RoPE)
    retain: str = "fifo"
    recent: Optional[int] = None
    budget: int = 0  # pairs held: sinks + slots + window

    def make_cache(self, config: Any) -> Any:
        from transformers import DynamicCache

        from ..hf import FoldCache
        from ..rope import RoPE

        if self.rule is None:
            return DynamicCache(config=config)
        rope = RoPE.from_config(config) if self.rope else None
        return FoldCache(
            self.rule,
            window=self.window,
            sinks=self.sinks,
            rope=rope,
            retain=self.retain,
            recent=self.recent,
            memory=MEMORY,
        )


@dataclass
class Result:
    memory: str
    kind: str
    budget: int
    perplexity: List[float] = field(default_factory=list)  # one value per segment
    kl: List[float] = field(default_factory=list)
    top1: List[float] = field(default_factory=list)


def _merge(slots: int, rope: bool, log_count: bool) -> str:
    return f"merge {slots}" + (", RoPE" if rope else "") + (", log-count" if log_count else "")


def memories(budgets: Sequence[int]) -> List[Memory]:
    """The full cache, then for each budget N (M = N / 8 merge slots): StreamingLLM (sinks 4 + window),
    one summary slot beside it, M Merge slots with and without RoPE-aware folding and the log-count bias,
    attention-chosen windows (TOVA with and without sinks, H2O), and TOVA with M or 2M Merge slots."""
    grid = [Memory("full cache", "full cache", None)]
    for n in budgets:
        if n < 16:
            raise ValueError(f"budgets: expected budgets of at least 16 pairs, got {n}")
        m = n // 8
        w = n - 4 - m  # the window beside 4 sinks and m slots
        grid.append(Memory(f"sinks 4 + window {n - 4}", "sinks 4 + window", rules.Drop(), n - 4, 4, budget=n))
        grid.append(
            Memory(
                f"sinks 4 + window {n - 5} + cumulative",
                "sinks 4 + window + cumulative",
                rules.Cumulative(),
                n - 5,
                4,
                budget=n,
            )
        )
        for rope in (False, True):
            for log_count in (False, True):
                kind = _merge(m, rope, log_count).replace(f"merge {m}", "merge N/8")
                grid.append(
                    Memory(
                        f"sinks 4 + window {w} + {_merge(m, rope, log_count)}",
                        f"sinks 4 + window + {kind}",
                        rules.Merge(m, bias="log_count" if log_count else None),
                        w,
                        4,
                        rope,
                        budget=n,
                    )
                )
        grid += [
            Memory(f"TOVA {n}", "TOVA", rules.Drop(), n, retain="tova", budget=n),
            Memory(f"sinks 4 + TOVA {n - 4}", "sinks 4 + TOVA", rules.Drop(), n - 4, 4, retain="tova", budget=n),
            Memory(f"H2O {n} (recent {n // 2})", "H2O", rules.Drop(), n, retain="h2o", budget=n),
            Memory(
                f"TOVA {n - m} + {_merge(m, True, True)}",
                "TOVA + merge N/8, RoPE, log-count",
                rules.Merge(m),
                n - m,
                0,
                True,
                "tova",
                budget=n,
            ),
            Memory(
                f"TOVA {n - 2 * m} + {_merge(2 * m, True, True)}",
                "TOVA + merge N/4, RoPE, log-count",
                rules.Merge(2 * m),
                n - 2 * m,
                0,
                True,
                "tova",
                budget=n,
            ),
            Memory(
                f"sinks 4 + TOVA {w} + {_merge(m, True, True)}",
                "sinks 4 + TOVA + merge N/8, RoPE, log-count",
                rules.Merge(m),
                w,
                4,
                True,
                "tova",
                budget=n,
            ),
        ]
    return grid


class _Progress:
    """tqdm when installed, else a line per tenth of the work on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.bar, self.enabled = total, 0, None, enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="tok", desc="kvfold eval", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and before * 10 // self.total != self.done * 10 // self.total:
            print(f"kvfold eval: {self.done}/{self.total} tokens", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def select(grid: List[Memory], kinds: Optional[Sequence[str]]) -> List[Memory]:
    """The memories of ``grid`` whose kind is in ``kinds`` (all for None), after the full cache."""
    if kinds is None:
        return grid
    known = list(dict.fromkeys(m.kind for m in grid if m.rule is not None))
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ValueError(f"kinds: expected kinds among {known}, got {unknown}")
    return [m for m in grid if m.rule is None or m.kind in kinds]


def read_text(path: str) -> str:
    """The UTF-8 text of the file at ``path``; a file that cannot be read as such is a ValueError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"text: expected a UTF-8 file, {path!r} has byte 0x{error.object[error.start]:02x} at {error.start}"
        ) from None
    except OSError as error:
        raise ValueError(f"text: expected a readable file, {path!r}: {error.strerror or error}") from None


def writable_folder(path: str) -> Path:
    """The folder at ``path``, made if missing, checked before the measurement it would hold."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"out: expected a folder kvfold can write, {path!r}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"out: expected a folder kvfold can write, {path!r} is read-only")
    return folder


def run(
    tokens: int = 1024,
    budgets: Sequence[int] = (64, 256),
    chunk: int = 64,
    out: str = "kvfold-eval",
    progress: bool = True,
    threads: int = 1,
    segments: int = 2,
    text: Optional[str] = None,
    kinds: Optional[Sequence[str]] = None,
) -> List[Result]:
    """Measures every memory of ``memories(budgets)`` on ``segments`` pieces of ``tokens`` tokens of ``text``
    (a UTF-8 file; default CPython's documentation); writes ``out``/eval.csv and eval.png, prints a table.

    ``chunk``: tokens per model call (speed only: kvfold's attention reads the memories token by token).
    ``threads``: torch threads while measuring. ``kinds``: measure only the memories of these kinds (the
    ``kind`` of ``memories``, e.g. ``"sinks 4 + window"`` or ``"TOVA"``; the full cache always runs)."""
    if tokens < 2:
        raise ValueError(f"tokens: expected at least 2, got {tokens}")
    if chunk < 1:
        raise ValueError(f"chunk: expected at least 1, got {chunk}")
    if threads < 1:
        raise ValueError(f"threads: expected at least 1, got {threads}")
    if segments < 1:
        raise ValueError(f"segments: expected at least 1, got {segments}")
    # A memory of at least `tokens` pairs holds a whole segment: it is the full cache, whatever its kind.
    whole = [n for n in budgets if n >= tokens]
    budgets = [n for n in budgets if n < tokens]
    if not budgets:
        raise ValueError(
            f"budgets: expected budgets below tokens={tokens} (a memory of that many pairs holds a whole segment), "
            f"got {whole}"
        )
    if whole:
        print(f"budgets {', '.join(map(str, whole))} left out: a memory of {tokens} pairs holds a whole segment")
    body = None if text is None else read_text(text)
    target = writable_folder(out)
    import torch

    from . import smollm2

    grid = select(memories(budgets), kinds)
    source = "CPython's documentation" if text is None else Path(text).name
    body = smollm2.bundled_text() if body is None else body
    model, tokenizer = smollm2.load()
    ids = tokenizer(body, return_tensors="pt").input_ids
    if ids.shape[1] < segments * tokens:
        raise ValueError(
            f"text: {segments} segments of {tokens} tokens need {segments * tokens} tokens, {source} has {ids.shape[1]}"
        )
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with smollm2.kvfold_attention(model):
            results = [Result(m.name, m.kind, tokens if m.rule is None else m.budget) for m in grid]
            bar = _Progress(segments * tokens, progress)
            for s in range(segments):
                _measure(model, ids[:, s * tokens : (s + 1) * tokens], grid, results, chunk, bar)
            bar.close()
    finally:
        torch.set_num_threads(threads_before)
    print(table(results, tokens, segments, source, model.config.num_hidden_layers))
    write_csv(results, target / "eval.csv")
    plot(results, target / "eval.png", f"{tokens} tokens of {source}")
    print(f"\nwrote {target / 'eval.csv'} and {target / 'eval.png'}")
    return results


def _measure(model: Any, ids: Any, grid: Sequence[Memory], results: List[Result], chunk: int, bar: _Progress) -> None:
    """One segment: every memory from an empty cache, in lockstep, block by block."""
    import torch
    import torch.nn.functional as F

    tokens = ids.shape[1]
    targets = ids[0, 1:]
    caches = [m.make_cache(model.config) for m in grid]
    nll, kl, agree = [0.0] * len(grid), [0.0] * len(grid), [0] * len(grid)
    with torch.no_grad():
        for start in range(0, tokens, chunk):
            block = ids[:, start : start + chunk]
            scored = min(block.shape[1], tokens - 1 - start)  # the last token has nothing to predict
            reference = None
            for i, cache in enumerate(caches):
                logits = model(block, cache=cache).logits[0, :scored]
                if scored <= 0:
                    continue
                logp = F.log_softmax(logits.double(), dim=-1)
                if reference is None:  # the full cache comes first
                    reference = logp
                nll[i] -= float(logp.gather(1, targets[start : start + scored, None]).sum())
                kl[i] += float((reference.exp() * (reference - logp)).sum())
                agree[i] += int((logp.argmax(-1) == reference.argmax(-1)).sum())
            bar.update(block.shape[1])
    for i, r in enumerate(results):
        r.perplexity.append(math.exp(nll[i] / (tokens - 1)))
        r.kl.append(kl[i] / (tokens - 1))
        r.top1.append(agree[i] / (tokens - 1))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def write_csv(results: Sequence[Result], path: Path) -> None:
    """One row per memory: the mean over segments, then each segment's value (semicolon-separated)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["memory", "budget", "perplexity", "kl", "top1", "perplexity_segments", "kl_segments", "top1_segments"]
        )
        for r in results:
            writer.writerow(
                [r.memory, r.budget, f"{_mean(r.perplexity):.4f}", f"{_mean(r.kl):.5f}", f"{_mean(r.top1):.4f}"]
                + [";".join(f"{x:.5f}" for x in xs) for xs in (r.perplexity, r.kl, r.top1)]
            )


def _spread(xs: Sequence[float], fmt: str, scale: float = 1.0) -> str:
    mean = format(scale * _mean(xs), fmt)
    if len(xs) == 1:
        return mean
    return f"{mean} ({format(scale * min(xs), fmt)}–{format(scale * max(xs), fmt)})"


def table(results: Sequence[Result], tokens: int, segments: int, source: str, layers: int) -> str:
    """A Markdown table, ready for the README: the mean over segments and, in brackets, their range. The
    last column compares the mean KL with StreamingLLM's (sinks 4 + window) at the same budget."""
    base: Dict[int, float] = {r.budget: _mean(r.kl) for r in results if r.kind == "sinks 4 + window"}
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF, float32 compute, {layers} layers), {segments} segment"
        f"{'s' if segments > 1 else ''} of {tokens} tokens of {source}, token by token",
        "",
        "| memory | pairs held | perplexity | KL(full ‖ memory) | top-1 agreement | KL vs sinks + window |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        change = f"{100 * (_mean(r.kl) / base[r.budget] - 1):+.0f}%" if r.budget in base and base[r.budget] else ""
        lines.append(
            f"| {r.memory} | {r.budget} | {_spread(r.perplexity, '.2f')} | {_spread(r.kl, '.4f')} | "
            f"{_spread(r.top1, '.1f', 100)}% | {change} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[Result], path: Path, what: str) -> None:
    """KL and perplexity against the pairs held; one line per kind of memory through its budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    kinds = list(dict.fromkeys(r.kind for r in results if r.kind != "full cache"))
    markers = "osD^v<>ph*"
    for i, kind in enumerate(kinds):
        points = sorted((r.budget, _mean(r.perplexity), _mean(r.kl)) for r in results if r.kind == kind)
        for ax, column in zip(axes, (2, 1)):
            ax.plot(
                [p[0] for p in points],
                [p[column] for p in points],
                marker=markers[i % len(markers)],
                color=f"C{i % 10}",
                linestyle="-" if i < 10 else "--",
                label=kind,
            )
    full = next(r for r in results if r.kind == "full cache")
    axes[1].axhline(_mean(full.perplexity), color="grey", linestyle=":", linewidth=1, label="full cache")
    axes[0].set_ylabel("mean KL(full ‖ memory), nats/token")
    axes[1].set_ylabel("perplexity (lower is better)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("pairs held per layer and KV head")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"SmolLM2-135M on {what}: memories at equal budgets of pairs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
