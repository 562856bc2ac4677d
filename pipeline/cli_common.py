"""What every `pipeline` command module shares: the error console, how a command fails, the exit codes
every --help ends with, and the old names of renamed flags."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # messages name paths and URLs: never break them


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


# Every command's --help ends with these (see `_with_exit_codes`).
EXIT_CODES = ("Exit codes: 0 done; 1 failed (the error names the file, shard, run or address); 2 bad usage or "
              "config (the error names the option or key); 3 done, but declined or partial (promote: not promoted; "
              "sweep: some trials failed for good); 130 interrupted.")


def with_exit_codes(typer_app: typer.Typer) -> None:
    """Give every command and command group of ``typer_app`` the exit codes as its help epilog."""
    typer_app.info.epilog = typer_app.info.epilog or EXIT_CODES
    for command in typer_app.registered_commands:
        command.epilog = command.epilog or EXIT_CODES
    for group in typer_app.registered_groups:
        with_exit_codes(group.typer_instance)


# Flags renamed so that each name means one thing everywhere; the old names still work, with a notice.
RENAMED_FLAGS = {
    ("data", "images"): {"--workers": "--processes"},
    ("data", "deformed-mnist"): {"--workers": "--processes"},
    ("data", "index"): {"--workers": "--threads"},
    ("evaluate",): {"--data-url": "--data"},
    ("decode",): {"--tokens": "--data"},
    ("bench", "data"): {"--batch": "--batch-size"},
    ("bench", "train"): {"--batch": "--batch-size"},
}


def renamed_flags(argv: list[str], warn=lambda old, new: None) -> list[str]:
    """``argv`` (after the program name) with deprecated flag names of its command replaced by the
    current ones (``--old VALUE`` and ``--old=VALUE``); ``warn(old, new)`` is told of each."""
    for path, renames in RENAMED_FLAGS.items():
        if tuple(argv[: len(path)]) != path:
            continue
        out = list(argv[: len(path)])
        for arg in argv[len(path):]:
            name, eq, value = arg.partition("=")
            if name in renames:
                warn(name, renames[name])
                arg = renames[name] + eq + value
            out.append(arg)
        return out
    return list(argv)
