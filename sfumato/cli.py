"""The ``sfumato`` command line: a thin dispatcher.

Each role declares its own subcommands in its ``commands`` module (``sfumato.commands`` for the
core's ``triton serve``, ``sfumato.export.commands``, ``sfumato.training.commands``,
``sfumato.clients.commands``, ``sfumato.control_plane.commands``), registered under the
``sfumato.commands`` entry-point group in ``pyproject.toml``: this module imports no role. A
command module keeps its heavy imports inside the command bodies, so building the parser stays
cheap. Every error Sfumato raises on purpose ends as one line on standard error and its exit
code (2 for bad input).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from sfumato.errors import SfumatoError

ENTRY_POINT_GROUP = "sfumato.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfumato", description="Serve text-to-image diffusion models on NVIDIA Triton."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    if not found:
        raise SystemExit("sfumato: error: no commands registered; reinstall the package (pip install -e .)")
    for entry in found:
        register: Callable[[argparse._SubParsersAction], None] = entry.load()
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SfumatoError as exc:
        print(f"sfumato: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
