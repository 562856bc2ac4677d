"""The command line speaks one dialect: -h and --help everywhere, --version, shell completion, help text
on every argument and option, and the exit codes at the end of every --help."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.common import EXIT_CODES

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
    assert result.exit_code == 0
    assert result.output.strip() == f"pipeline {version('catvae-pipeline')} (distribution catvae-pipeline)"
    options = {opt for param in ROOT.params for opt in param.opts}
    assert {"--version", "--install-completion", "--show-completion", "-h", "--help"} <= options | {"-h", "--help"}
    assert ROOT.context_settings["help_option_names"] == ["-h", "--help"]


def test_renamed_flags_still_work_with_a_notice() -> None:
    """Old names of renamed flags keep working for scripts: rewritten to the current name, each with a notice."""
    from pipeline.cli.common import RENAMED_FLAGS, renamed_flags

    told = []
    argv = ["data", "images", "--source", "x", "--workers", "4", "--out=y"]
    assert renamed_flags(argv, lambda old, new: told.append((old, new))) == [
        "data", "images", "--source", "x", "--processes", "4", "--out=y"]
    assert renamed_flags(["evaluate", "RUN", "--data-url=s3://b/d"], lambda *a: told.append(a)) == [
        "evaluate", "RUN", "--data=s3://b/d"]
    assert told == [("--workers", "--processes"), ("--data-url", "--data")]
    # only within the command that renamed it: plan's --workers are Ray workers and stay
    assert renamed_flags(["plan", "--workers", "64"]) == ["plan", "--workers", "64"]
    # every new name exists on its command, every old one is gone from it
    for path, renames in RENAMED_FLAGS.items():
        command = dict(COMMANDS)[path]
        options = {opt for param in command.params for opt in param.opts}
        assert set(renames.values()) <= options and not set(renames) & options, path


def test_the_command_line_applies_the_renames(tmp_path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline", "data", "images", "--source", str(tmp_path / "none"),
                           "--out", str(tmp_path / "out"), "--workers", "2"], capture_output=True, text=True, timeout=120)
    text = " ".join(proc.stderr.split())
    assert "warning: --workers is deprecated here: use --processes" in text
    assert "No such option" not in text and proc.returncode == 1, text  # the folder is missing, the flag was fine
