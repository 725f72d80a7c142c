"""Layer: cowd (CLI support).  The image lifecycle commands: commit, rebase, resize."""

from __future__ import annotations

import argparse

from formats import OpenPolicy

from .errors import CommandFailed


def run(args: argparse.Namespace, policy: OpenPolicy) -> int:
    raise CommandFailed(f"{args.command}: not implemented yet")
