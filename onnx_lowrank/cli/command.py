"""What every command is: a name, its help, the argument groups it uses, and a ``run`` that parses, calls the
library and prints."""

from __future__ import annotations

import argparse
from typing import Any

from .args import ArgGroup

__all__ = ["Command"]


class Command:
    """One subcommand. :meth:`add_arguments` adds its positionals and its own flags; the shared groups come
    from :meth:`groups`; :meth:`run` returns the exit code (2 for bad input is raised as ``LowRankError``)."""

    name = ""
    help = ""
    description: str | None = None

    def groups(self) -> list[ArgGroup]:
        return []

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def add_parser(self, sub: Any) -> None:
        parser = sub.add_parser(self.name, help=self.help, description=self.description or self.help)
        self.add_arguments(parser)
        for group in self.groups():
            group.add(parser)
        self.add_late_arguments(parser)

    def add_late_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Flags listed after the shared groups in ``--help``."""

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError
