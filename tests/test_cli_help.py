"""The command line speaks one dialect: -h and --help everywhere, --version, shell completion, help text
on every argument and option, and the exit codes at the end of every --help."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import EXIT_CODES, app

ROOT = typer.main.get_command(app)


def _commands(command, path: tuple[str, ...] = ()) -> list:
    found = [(path, command)]
    if hasattr(command, "commands"):  # a group (Typer's own click underneath)
        for name, sub in sorted(command.commands.items()):
            found += _commands(sub, path + (name,))
    return found


COMMANDS = _commands(ROOT)


def test_the_tree_is_walked() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"train", "evaluate", "sweep", "data images", "bench tokenizer", "jobs logs", "promote"} <= names
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=[" ".join(p) or "pipeline" for p, _ in COMMANDS])
def test_short_help_ends_with_the_exit_codes(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "-h"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Usage:" in text and "Exit codes: 0 done; 1 failed" in text and text.endswith(EXIT_CODES.split()[-1])


def test_every_argument_and_option_says_what_it_is() -> None:
    silent = [(" ".join(path), param.name) for path, command in COMMANDS for param in command.params
              if param.name != "help" and not (getattr(param, "help", None) or "").strip()]
    assert silent == []


def test_version_and_completion() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"pipeline {version('pipeline')}"
    options = {opt for param in ROOT.params for opt in param.opts}
    assert {"--version", "--install-completion", "--show-completion", "-h", "--help"} <= options | {"-h", "--help"}
    assert ROOT.context_settings["help_option_names"] == ["-h", "--help"]
