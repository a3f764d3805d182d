"""The shape of a sub-command of ``lastlayer``: what the commands table of :mod:`lastlayer.cli` and
the actions of ``lastlayer job`` (:mod:`lastlayer.cli.job`) are made of."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Command:
    """One sub-command: its option classes, positional arguments, help and runner; or, for a command
    made of actions (``job deploy``, ``job plan show``), the actions, each a Command of its own."""

    options: tuple[type, ...]
    help: str
    run: Callable[[argparse.Namespace, Any], int] | None  # (flags, the cluster login or None)
    positionals: tuple[tuple[str, str, str], ...] = ()  # (name, nargs, help)
    cluster: bool = False
    actions: Mapping[str, Command] = field(default_factory=dict)  # nested sub-commands
    usage: str = ""  # named by the errors for a missing or unknown action
    build: Callable[[argparse.ArgumentParser], None] | None = None  # adds more (positionals, epilog)
