"""The `capeen` console script: one entry point, one subcommand per job.

Handlers are imported lazily so that `capeen --help` and light commands do not pay for importing torch.
Every handler takes the parsed namespace and returns an exit code. Expected failures (bad input, missing
files) raise `UserError`, which is printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys


class UserError(Exception):
    """A problem the user can fix: printed as one line on stderr, exit status 2."""


def _handler(target: str):
    def run(args: argparse.Namespace) -> int:
        module_name, function_name = target.split(":")
        return getattr(importlib.import_module(module_name), function_name)(args)

    return run


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="generate the synthetic captioning data set (images + Karpathy-style JSON)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--workers", type=int, default=0, help="processes drawing images (0: one per core)")
    p.set_defaults(func=_handler("models.synthetic:cli_main"))


SUBCOMMANDS = [_add_data]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capeen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"capeen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"capeen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
