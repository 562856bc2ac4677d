"""What every `pipeline` command shares: the error console, how a command fails, the options many
commands take (config overrides, the MLflow store, the Ray cluster), the exit codes every --help ends
with, and the old names of renamed flags."""

from __future__ import annotations

import functools
import os
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # messages name paths and URLs: never break them


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def fail_on(typer_app: typer.Typer, error: type[Exception], code: int = 1) -> None:
    """Every command of ``typer_app`` (and of its groups) fails through `fail` on ``error``: a lower
    layer's domain error (`pipeline.bench.BenchError`) becomes ``error: message`` and exit ``code``."""

    def failing(callback: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(callback)  # typer reads the options off the wrapped function
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except error as err:
                fail(str(err), code)

        return run

    for command in typer_app.registered_commands:
        command.callback = failing(command.callback)
    for group in typer_app.registered_groups:
        fail_on(group.typer_instance, error, code)


# --- Options more than one command takes -----------------------------------------------------------

def overrides_option(help: str = "Dotted config override, repeatable: -o train.epochs=3 -o "
                     "model.latent.categories=10") -> Any:
    """The repeatable ``--override/-o KEY=VALUE`` of every command that reads a config; ``help`` where a
    command says more (or less) about it."""
    return Annotated[Optional[list[str]], typer.Option("--override", "-o", help=help)]


def tracking_uri_option(help: str) -> Any:
    """``--tracking-uri``: the MLflow store (`pipeline.runs.store.resolve_tracking_uri` applies the
    precedence flag > $MLFLOW_TRACKING_URI > config > ./mlflow.db); ``help`` says it for the command."""
    return Annotated[Optional[str], typer.Option("--tracking-uri", help=help)]


Overrides = overrides_option()
TrackingUri = tracking_uri_option("MLflow store (default as for train)")
StoreUri = tracking_uri_option("MLflow store (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")  # no config read
RayAddress = Annotated[  # where Ray work runs in this process: train, sweep, encode
    Optional[str], typer.Option("--address", help="Ray cluster to use (default $RAY_ADDRESS, else a local cluster)")
]
JobsAddress = Annotated[  # where jobs are submitted: submit, schedule, jobs ...
    Optional[str], typer.Option("--address", help="Ray Jobs API of the cluster, http://HEAD:8265 (default $RAY_ADDRESS)")
]
OutUrl = Annotated[str, typer.Option("--out", help="Output directory or fsspec URL (file://, s3://, gs://, memory://)")]


def load_config(config_path: str, overrides: list[str] | None):
    """The config file with its overrides; a bad file or key is a usage error (exit 2)."""
    from pipeline.config import ConfigError, load_config as load

    try:
        return load(config_path, overrides or [])
    except ConfigError as err:
        fail(str(err), code=2)


def ray_auth(address: str | None = None, *, always: bool = False) -> None:
    """Ray's token authentication for a cluster started with `ray start`, turned on before anything imports
    Ray (its config is read once per process): ``always`` for the Jobs API, else when ``address`` or
    $RAY_ADDRESS names a cluster (a local one needs none)."""
    if always or address or os.environ.get("RAY_ADDRESS"):
        from pipeline.ops.ray_jobs import enable_token_auth

        enable_token_auth()


# --- Exit codes and renamed flags ------------------------------------------------------------------

# Every command's --help ends with these (see `with_exit_codes`).
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


def warn_renamed(old: str, new: str) -> None:
    """The deprecation notice for an old flag name."""
    console.print(f"[yellow]warning:[/] {old} is deprecated here: use {new}")
