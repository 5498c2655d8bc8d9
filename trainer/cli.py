"""The `trainer` command: parse, build, call, and report any failure in one line.

No training logic lives here; each command hands over to a module that owns it.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from dali_pipes import LoaderError, PackError

F = TypeVar("F", bound=Callable[..., Any])

# Exceptions whose message is already a sentence for the user; anything else gets its
# type named too, and a pointer to --debug.
USER_ERRORS: tuple[type[BaseException], ...] = (PackError, LoaderError)


def user_errors() -> tuple[type[BaseException], ...]:
    """All exception types whose message is meant for the user (collected lazily to keep import light)."""
    from trainer.errors import TrainerError

    return (*USER_ERRORS, TrainerError)


def one_line_errors(func: F) -> F:
    """Add `--debug` and turn exceptions into one `error: ...` line with exit status 1."""

    @click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
    @functools.wraps(func)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the whole point is one line for any failure
            if debug:
                raise
            if isinstance(exc, user_errors()):
                message = str(exc)
            elif isinstance(exc, OSError) and exc.strerror:
                message = f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror}"
            else:
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (run with --debug for the traceback)"
            raise click.ClickException(message) from None

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dali-trainer")
def main() -> None:
    """Train and evaluate image classifiers on HDF5 packs, fed by DALI or torchvision pipelines."""


@main.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def info(pack: Path, as_json: bool) -> None:
    """Counts per split and class, image sizes and rejected files of PACK."""
    from dali_pipes.pack import PackReader
    from trainer.info import format_summary, pack_summary

    summary = pack_summary(PackReader(pack))
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo("\n".join(format_summary(summary)))


if __name__ == "__main__":
    main()
