"""The `pipeline` app: every command, registered in the order `pipeline --help` lists them, and `main()`,
the console script (also `python -m pipeline`)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pipeline.bench import BenchError, bench_app  # each bench module registers its own command on it
from pipeline.cli import data, docs, ops, tokens, train
from pipeline.cli.common import EXIT_CODES, fail_on, renamed_flags, warn_renamed, with_exit_codes

app = typer.Typer(
    help="Distributed training of VAEs with a categorical (multinomial) prior: "
    "WebDataset shards -> Ray Train DDP -> MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it
    epilog=EXIT_CODES,
)


def _print_version(value: bool) -> None:
    if value:
        import pipeline

        print(f"pipeline {pipeline.__version__} (distribution catvae-pipeline)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the installed version and exit")] = False,
) -> None:
    """Distributed training of VAEs with a categorical (multinomial) prior: WebDataset shards -> Ray Train
    DDP -> MLflow."""


app.add_typer(data.data_app, name="data")
app.add_typer(bench_app, name="bench")  # a bench's BenchError: `error: message`, exit 1
fail_on(bench_app, BenchError)
app.command()(train.train)
app.command()(ops.ui)
app.command("plan")(train.plan)
app.command("replay-metrics")(ops.replay_metrics)
app.command()(train.evaluate)
app.command()(tokens.encode)
app.command()(tokens.decode)
app.command(help=train.SWEEP_HELP)(train.sweep)
app.command("export")(tokens.export)
app.command("config")(train.show_config)
app.command()(ops.submit)
app.add_typer(ops.jobs_app, name="jobs")
app.command()(ops.schedule)
app.command()(ops.promote)
app.command()(ops.compare)
app.command("docs")(docs.docs_command)  # docs/reference/config.md and cli.md, generated from the code
with_exit_codes(app)


def main() -> None:
    sys.argv[1:] = renamed_flags(sys.argv[1:], warn_renamed)
    app()


if __name__ == "__main__":
    main()
