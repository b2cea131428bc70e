"""Subcommands of the CLI other than train: convert, sample, prepare, export."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Registers the remaining subcommands (filled in as they land)."""
