"""click command classes whose usage errors are one line (exit status 2).

Kept apart from `trainer.cli` and free of torch, so scripts such as tools/pack_dataset.py
use them without importing torch (their worker processes re-import the script).
"""
from __future__ import annotations

from typing import Any

import click

# `-h` besides `--help`, for `trainer` and every script in tools/.
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


class OneLineErrors(click.ClickException):
    """A usage error shown as one line (click's default adds the usage text and a hint)."""

    exit_code = 2


class OneLineUsageMixin:
    """Turns the usage errors of parsing a command's options and arguments into one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)  # type: ignore[misc]
        except click.UsageError as exc:
            raise _one_line(exc) from None


class OneLineUsageCommand(OneLineUsageMixin, click.Command):
    """A click command whose bad options and arguments get one line, exit status 2."""


class TrainerGroup(OneLineUsageMixin, click.Group):
    """The `trainer` group: like `OneLineUsageCommand`, for the group and its subcommands."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None


def _one_line(exc: click.UsageError) -> OneLineErrors:
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    return OneLineErrors(" ".join(exc.format_message().split()) + where)
