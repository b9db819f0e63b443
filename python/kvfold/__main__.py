"""Command line: ``python -m kvfold demo``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kvfold", description="Fixed-size attention memory for CPUs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="stream a long synthetic sequence through several rules")
    demo.add_argument("--tokens", type=int, default=20000, help="tokens streamed per rule (default 20000)")
    demo.add_argument("--check", type=int, default=256, help="tokens compared with kvfold.reference (default 256)")
    demo.add_argument("--heads", type=int, default=8, help="KV heads (default 8)")
    demo.add_argument("--head-dim", type=int, default=64, help="head size (default 64)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(tokens=args.tokens, check=args.check, heads=args.heads, head_dim=args.head_dim)
    return 2


if __name__ == "__main__":
    sys.exit(main())
