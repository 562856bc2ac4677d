"""The reference pages are generated from the code and kept current: docs/reference/config.md (pydantic models)
and docs/reference/cli.md (the Typer app) equal what `pipeline docs` writes, name every config key and every
command and option, and come out byte for byte the same on any machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.cli.docs import REPO, config_keys, pages, render_cli, render_config

ROOT = Path(__file__).parent.parent
DEFAULT = ROOT / "configs" / "digits-categorical.yaml"
GENERATED = pages()


@pytest.mark.parametrize("relative", list(GENERATED), ids=str)
def test_reference_page_is_current(relative: Path) -> None:
    path = ROOT / relative
    assert path.is_file(), f"{relative} is missing: run `pipeline docs`"
    assert path.read_text(encoding="utf-8") == GENERATED[relative], (
        f"{relative} is stale (the code changed since it was generated): run `pipeline docs` and commit it")


def test_every_config_key_is_documented() -> None:
    flat = load_config(DEFAULT).flat()  # the keys as MLflow params and -o overrides name them
    assert config_keys() == list(flat), "the reference enumerates the config keys differently from RunConfig.flat()"
    text = render_config()
    assert [key for key in flat if f"| `{key}` |" not in text] == []
    for section in ("data", "model", "model.latent", "train", "tracking"):
        assert f"## `{section}`" in text
    # no key without a description (a Field(description=...) in pipeline/config.py)
    blank = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert blank == []


def _commands(command, path: tuple[str, ...] = ()) -> list:
    found = [(path, command)]
    if hasattr(command, "commands"):  # a group (Typer ships its own click: duck typing, not isinstance)
        for name, sub in sorted(command.commands.items()):
            if not sub.hidden:
                found += _commands(sub, path + (name,))
    return found


def test_every_command_and_option_is_documented() -> None:
    text = render_cli()
    commands = _commands(typer.main.get_command(app))
    assert len(commands) > 30 and ("docs",) in [p for p, _ in commands]
    missing = []
    for path, command in commands:
        title = " ".join(("pipeline", *path))
        if f" `{title}`\n\n```text\n{title} " not in text:
            missing.append(title)
        section = text.split(f" `{title}`\n", 1)[-1].split("\n#", 1)[0]
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            names = [param.name] if param.param_type_name == "argument" else param.opts + param.secondary_opts
            missing += [f"{title} {name}" for name in names if f"`{name}" not in section]
        if "Exit codes: 0 done; 1 failed" not in section:
            missing.append(f"{title}: exit codes")
    assert missing == []


def test_pages_are_the_same_in_any_environment(tmp_path: Path) -> None:
    """Another terminal width, home, temporary folder and working directory: the same bytes."""
    script = ("import sys; from pipeline.cli.docs import pages; "
              "sys.stdout.buffer.write(b'\\0'.join(t.encode() for t in pages().values()))")
    env = {**os.environ, "COLUMNS": "37", "LINES": "5", "TERM": "xterm-256color", "FORCE_COLOR": "1",
           "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("NO_COLOR", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, check=True).stdout
    assert out == b"\0".join(t.encode() for t in GENERATED.values())
    for text in GENERATED.values():
        assert str(REPO) not in text and str(Path.home()) + os.sep not in text and "\x1b[" not in text


def test_docs_command_writes_and_checks(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["docs", "--check", "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert "stale: docs/reference/config.md" in result.output and "stale: docs/reference/cli.md" in result.output
    assert not (tmp_path / "docs").exists()  # --check writes nothing
    result = runner.invoke(app, ["docs", "--root", str(tmp_path)])
    assert result.exit_code == 0 and "wrote: docs/reference/cli.md" in result.output
    assert runner.invoke(app, ["docs", "--check", "--root", str(tmp_path)]).exit_code == 0
    page = tmp_path / "docs" / "reference" / "config.md"
    page.write_text(page.read_text().replace("Passes over the train split", "Passes"))
    result = runner.invoke(app, ["docs", "--check", "--root", str(tmp_path)])
    assert result.exit_code == 1 and "stale: docs/reference/config.md" in result.output
    assert "cli.md" not in result.output
