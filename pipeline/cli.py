"""`moola-pipeline`: the click group. Thin: each command parses, calls a library function, prints.

The commands live in `pipeline/commands/<area>.py` (data, train, jobs, report, runpod), one module
per area so each stays small; this module only assembles the group and turns `UserError` into one
line on stderr and a non-zero exit.
"""

from __future__ import annotations

import importlib
import sys

import click

from pipeline import __version__
from pipeline.errors import UserError

# (module under pipeline.commands, attribute) for every command or sub-group, in help order.
COMMANDS = [
    ("data", "data"),
    ("train", "train"),
    ("evaluate", "evaluate"),
    ("predict", "predict"),
    ("export", "export"),
    ("sweep", "sweep"),
    ("jobs", "submit"),
    ("jobs", "status"),
    ("jobs", "logs"),
    ("jobs", "stop"),
    ("jobs", "list_jobs"),
    ("report", "report"),
    ("report", "compare"),
    ("runpod", "runpod"),
    ("infra", "storage"),
    ("infra", "stack"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moola-pipeline")
def cli() -> None:
    """Train JadeCompact multi-task models on a laptop or a Ray cluster."""


def _register() -> None:
    for module_name, attr in COMMANDS:
        try:
            module = importlib.import_module(f"pipeline.commands.{module_name}")
        except ModuleNotFoundError as exc:  # an area not built yet
            if exc.name == f"pipeline.commands.{module_name}":
                continue
            raise
        command = getattr(module, attr, None)
        if command is not None:
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="moola-pipeline", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: bad flag, missing argument
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
