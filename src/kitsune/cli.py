"""Command line: `python -m kitsune demo [--device cpu|cuda]`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kitsune", description="Kitsune kernel-fusion compiler for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a small transformer-style block and compare with eager")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from kitsune.demo import main as demo_main
        return demo_main(args.device)
    return 2


if __name__ == "__main__":
    sys.exit(main())
