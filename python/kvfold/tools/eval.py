"""``python -m kvfold eval``: what each memory keeps of the full cache's quality, on a real model.

Teacher-forced streaming of real text (CPython's bundled documentation) through SmolLM2-135M-Instruct,
with a grid of memories at equal budgets of visible pairs: each memory holds ``budget`` pairs
(sinks + summary slots + window) per layer and KV head, and each token also sees itself (and, with
``chunk > 1``, the earlier tokens of its block). All memories run in lockstep over the same blocks, so
they are compared with the full cache on exactly the same inputs, and their speeds on the same machine
state. Per memory: perplexity of the next token, mean KL(full || memory) over the next-token
distributions, top-1 agreement with the full cache, cache bytes per layer and tokens/s.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from .. import rules


@dataclass
class Memory:
    name: str
    kind: str  # the memory without its budget, for the plot's legend
    rule: Optional[rules.Rule]  # None: the full cache (transformers' DynamicCache)
    window: int = 0
    sinks: int = 0
    budget: int = 0  # visible pairs held: sinks + slots + window

    def make_cache(self) -> Any:
        from transformers import DynamicCache

        from ..hf import FoldCache

        return DynamicCache() if self.rule is None else FoldCache(self.rule, window=self.window, sinks=self.sinks)


@dataclass
class Result:
    memory: str
    rule: str
    budget: int
    window: int
    sinks: int
    perplexity: float
    kl: float
    top1: float
    cache_bytes: int
    tokens_per_s: float


def memories(budgets: Sequence[int], ema_alpha: float = 0.05) -> List[Memory]:
    """The full cache, then for each budget N: the raw-pairs memories (window, StreamingLLM), the window
    plus one summary slot or compressed slots, and last the pure summary memory (one slot, window 0)."""
    grid = [Memory("full cache", "full cache", None)]
    for n in budgets:
        if n < 8:
            raise ValueError(f"budgets: expected budgets of at least 8 pairs, got {n}")
        c = n // 8  # compressed slots, each pooling 8 pairs
        grid += [
            Memory(f"window {n}", "window", rules.Drop(), window=n, budget=n),
            Memory(f"sinks 4 + window {n - 4}", "sinks 4 + window", rules.Drop(), window=n - 4, sinks=4, budget=n),
            Memory(f"window {n - 1} + cumulative", "window + cumulative", rules.Cumulative(), window=n - 1, budget=n),
            Memory(
                f"window {n - 1} + ema({ema_alpha:g})",
                f"window + ema({ema_alpha:g})",
                rules.EMA(ema_alpha),
                window=n - 1,
                budget=n,
            ),
            Memory(f"window {n - 1} + moving({n})", "window + moving(N)", rules.Moving(n), window=n - 1, budget=n),
            Memory(
                f"window {n - c} + compressive({c}x8)",
                "window + compressive(N/8 x 8)",
                rules.Compressive(c, 8),
                window=n - c,
                budget=n,
            ),
        ]
    grid.append(Memory("cumulative, window 0", "cumulative, window 0", rules.Cumulative(), budget=1))
    return grid


def _cache_bytes(cache: Any) -> int:
    """Bytes one layer holds: the kvfold memory, or the keys and values of the full cache."""
    layer = cache.layers[0]
    if hasattr(layer, "nbytes"):
        return int(layer.nbytes)
    return int(layer.keys.nbytes + layer.values.nbytes)


@dataclass
class _Tally:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    seconds: float = 0.0
    cache: Any = field(default=None, repr=False)


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


def run(
    tokens: int = 2048,
    budgets: Sequence[int] = (64, 256),
    chunk: int = 1,
    out: str = "kvfold-eval",
    progress: bool = True,
    ema_alpha: float = 0.05,
    threads: int = 1,
) -> List[Result]:
    """Measures every memory of ``memories(budgets)``; writes ``out``/eval.csv and eval.png, prints a table.

    ``threads``: torch threads while measuring (1 by default: on a small shared machine more threads
    mostly wait for each other; here two threads made a decode step 5x slower than one)."""
    if tokens < 2:
        raise ValueError(f"tokens: expected at least 2, got {tokens}")
    if chunk < 1:
        raise ValueError(f"chunk: expected at least 1, got {chunk}")
    if threads < 1:
        raise ValueError(f"threads: expected at least 1, got {threads}")
    import torch

    from . import smollm2

    grid = memories(budgets, ema_alpha)
    model, tokenizer = smollm2.load()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = _measure(model, tokenizer, grid, tokens, chunk, progress)
    finally:
        torch.set_num_threads(threads_before)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    write_csv(results, target / "eval.csv")
    plot(results, grid, target / "eval.png", results[0].budget)
    print(table(results, results[0].budget, chunk, model.config.num_hidden_layers, threads))
    print(f"\nwrote {target / 'eval.csv'} and {target / 'eval.png'}")
    return results


def _measure(
    model: Any, tokenizer: Any, grid: Sequence[Memory], tokens: int, chunk: int, progress: bool
) -> List[Result]:
    import torch
    import torch.nn.functional as F

    from . import smollm2

    text = smollm2.bundled_text()
    ids = tokenizer(text[: 16 * tokens], return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    tokens = ids.shape[1]
    targets = ids[0, 1:]
    tallies = [_Tally(cache=m.make_cache()) for m in grid]
    bar = _Progress(tokens, progress)
    with torch.no_grad():
        model(ids[:, :chunk], cache=grid[0].make_cache())  # warm-up, so that no memory pays for first calls
        for start in range(0, tokens, chunk):
            block = ids[:, start : start + chunk]
            scored = min(block.shape[1], tokens - 1 - start)  # the last token has nothing to predict
            reference = None
            for tally in tallies:
                began = time.perf_counter()
                logits = model(block, cache=tally.cache).logits[0, :scored]
                tally.seconds += time.perf_counter() - began
                if scored <= 0:
                    continue
                logp = F.log_softmax(logits.double(), dim=-1)
                if reference is None:  # the full cache comes first
                    reference = logp
                tally.nll -= float(logp.gather(1, targets[start : start + scored, None]).sum())
                tally.kl += float((reference.exp() * (reference - logp)).sum())
                tally.agree += int((logp.argmax(-1) == reference.argmax(-1)).sum())
            bar.update(block.shape[1])
    bar.close()
    scored_total = tokens - 1
    results = [
        Result(
            memory=m.name,
            rule="-" if m.rule is None else repr(m.rule),
            budget=tokens if m.rule is None else m.budget,
            window=tokens if m.rule is None else m.window,
            sinks=m.sinks,
            perplexity=math.exp(t.nll / scored_total),
            kl=t.kl / scored_total,
            top1=t.agree / scored_total,
            cache_bytes=_cache_bytes(t.cache),
            tokens_per_s=tokens / t.seconds,
        )
        for m, t in zip(grid, tallies)
    ]
    return results


def write_csv(results: Sequence[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        for r in results:
            row = asdict(r)
            row.update(
                perplexity=f"{r.perplexity:.4f}",
                kl=f"{r.kl:.5f}",
                top1=f"{r.top1:.4f}",
                tokens_per_s=f"{r.tokens_per_s:.1f}",
            )
            writer.writerow(row)


def table(results: Sequence[Result], tokens: int, chunk: int, layers: int, threads: int) -> str:
    """A Markdown table, ready for the README."""
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF, float32 compute, {layers} layers), {tokens} tokens of CPython's "
        f"documentation, blocks of {chunk} token{'s' if chunk > 1 else ''}, {threads} torch thread"
        f"{'s' if threads > 1 else ''}",
        "",
        "| memory | pairs held | perplexity | KL(full ‖ memory) | top-1 agreement | bytes / layer | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.memory} | {r.budget} | {r.perplexity:.2f} | {r.kl:.4f} | {100 * r.top1:.1f}% | "
            f"{r.cache_bytes:,} | {r.tokens_per_s:.1f} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[Result], grid: Sequence[Memory], path: Path, tokens: int) -> None:
    """Perplexity and KL against bytes per layer; one line per kind of memory through its budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    kinds = list(dict.fromkeys(m.kind for m in grid))
    markers = "*osD^v<>ph"
    for i, kind in enumerate(kinds):
        points = sorted((r.cache_bytes, r.perplexity, r.kl) for r, m in zip(results, grid) if m.kind == kind)
        xs = [p[0] for p in points]
        for ax, column in zip(axes, (1, 2)):
            if column == 2 and kind == "full cache":  # KL 0: off a log axis
                continue
            ax.plot(
                xs,
                [p[column] for p in points],
                marker=markers[i % len(markers)],
                color=f"C{i}",
                label=kind,
                markersize=11 if kind == "full cache" else 6,
                linestyle="-" if len(xs) > 1 else "none",
            )
    full = results[0]
    axes[0].axhline(full.perplexity, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylabel("perplexity (lower is better)")
    axes[1].set_ylabel("mean KL(full ‖ memory), nats/token")
    kib = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 2**20:g} MiB" if x >= 2**20 else f"{x / 1024:g} KiB")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(kib)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("cache bytes per layer (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"SmolLM2-135M on {tokens} tokens of CPython docs: memories at equal budgets of pairs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
