"""The `ptdit` command. Each subcommand imports what it needs when it runs.

    ptdit models [--format table|csv|json|markdown]
"""

import argparse
import sys

FORMATS = ("table", "csv", "json", "markdown")


def cmd_models(args: argparse.Namespace) -> int:
    import pandas as pd

    from bench.report import render
    from ptdit.configs import describe, list_models

    df = pd.DataFrame([describe(name) for name in list_models()])
    print(render(df, args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptdit", description="PT-DiT, DiT and PixArt-alpha: models, cost and analysis.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="every named configuration: parameters (ours vs the "
                       "paper's, in millions), depth, width, heads, patch, attention layout")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"ptdit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
