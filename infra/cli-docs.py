"""Regenerate docs/cli.md: the --help of every moola-pipeline command, as the code prints it.

    .venv/bin/python infra/cli-docs.py > docs/cli.md
"""

from __future__ import annotations

import datetime
import os

import click
from click.testing import CliRunner

from pipeline.cli import cli

HEADER = """# CLI reference

The `--help` of every `moola-pipeline` command, as printed by the code on {date} (each section
is `COLUMNS=100 moola-pipeline COMMAND --help`; regenerate with `.venv/bin/python
infra/cli-docs.py > docs/cli.md` when a command changes). The README explains how the commands
fit together.
"""


def walk(group: click.Command, path: list[str]):
    yield path
    if isinstance(group, click.Group):
        for name in group.commands:  # help order (registration), not sorted
            yield from walk(group.get_command(None, name), path + [name])


def main() -> None:
    os.environ["COLUMNS"] = "100"
    print(HEADER.format(date=datetime.date.today().isoformat()))
    runner = CliRunner()
    for path in walk(cli, []):
        text = runner.invoke(cli, [*path, "--help"], prog_name="moola-pipeline",
                             terminal_width=100).output
        print(f"## `{' '.join(['moola-pipeline', *path])}`\n\n```\n{text.rstrip()}\n```\n")


if __name__ == "__main__":
    main()
