"""The gdrd-fast command: `gdrd-fast <subcommand> --help`."""
from __future__ import annotations

import argparse


def _env(args) -> int:
    from .env import env_report
    print(env_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdrd-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="what was built and which devices exist")
    env.set_defaults(func=_env)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
