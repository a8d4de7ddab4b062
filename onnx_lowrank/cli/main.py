"""``onnx-lowrank``: a thin command line over :mod:`onnx_lowrank.api`, :mod:`onnx_lowrank.sweep` and
:mod:`onnx_lowrank.verify`.

Each command is a module of this package (``decompose``, ``sweep``, ``inspect``, ``verify``) that parses,
calls the library and prints. Bad input ends in one line on stderr and exit code 2; outputs that differ
beyond tolerance in ``verify`` exit 1; a bug of ours is one line (exit 1) unless ``ONNX_LOWRANK_DEBUG`` asks
for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import LowRankError
from .args import Parser
from .command import Command
from .decompose import Decompose
from .inspect import Inspect
from .sweep import Sweep
from .verify import Verify

__all__ = ["PROG", "commands", "main", "parser"]

PROG = "onnx-lowrank"


def commands() -> list[Command]:
    """The subcommands, in the order ``--help`` lists them."""
    return [Decompose(), Inspect(), Verify(), Sweep()]


def parser(registry: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    top = Parser(prog=PROG, description="Speed up ONNX CNNs by low-rank decomposition of their convolutions (Tai et al., ICLR 2016).")
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in registry if registry is not None else commands():
        command.add_parser(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    registry = {command.name: command for command in commands()}
    try:
        args = parser(list(registry.values())).parse_args(argv)
        return registry[args.command].run(args)
    except LowRankError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader (head, less) went away: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # a size no check foresaw: still the input's size, not a bug
        print(f"{PROG}: error: out of memory (the model or its data is too large for this machine)", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug of ours: one line unless asked for the traceback
        if os.environ.get("ONNX_LOWRANK_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc} (set ONNX_LOWRANK_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
