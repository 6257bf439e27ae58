"""Every command has help with an example and is named in README.md; README's test command is what CI runs."""
from __future__ import annotations

from pathlib import Path

import click
import pytest

from ingest.cli import cli as ingest_cli
from search.cli import cli as search_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def commands(group: click.Group, prefix: str):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


ALL = list(commands(ingest_cli, "ingest")) + list(commands(search_cli, "search"))


@pytest.mark.parametrize("name, command", ALL, ids=[n for n, _ in ALL])
def test_command_has_help_with_example_and_is_in_readme(name, command):
    assert command.help and "Example:" in command.help, f"{name} needs help text with an Example:"
    assert f"`{name}" in README, f"{name} is not documented in README.md"


def test_ci_runs_the_test_command_from_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/pip install --quiet -e '.[test]'" in ci and ".venv/bin/pytest" in ci
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest" in README
