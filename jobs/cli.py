"""The `tailseed` command line: one subcommand per job, each module registering its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

from tailseed.jobs import console

# subcommand -> module that defines `add_parser(subparsers)`; each sets `func` on its parser.
SUBCOMMANDS = {
    "augment": "tailseed.jobs.augment",
    "invert": "tailseed.jobs.seed_commands",
    "generate": "tailseed.jobs.seed_commands",
    "inspect": "tailseed.jobs.inspect_output",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tailseed")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailseed", description="Grow the rare classes of an image dataset."
    )
    parser.add_argument("--version", action="version", version=f"tailseed {_version()}")
    console.add_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    registered = set()
    for module_name in SUBCOMMANDS.values():
        if module_name in registered:
            continue
        registered.add(module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a subcommand whose module is not built yet is absent, not faked
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tailseed.jobs.exits import guarded

    args = build_parser().parse_args(argv)
    console.configure(args.verbosity)
    return guarded(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
