"""`pipeline bench ...`: measurements that back the project's claims (memory, throughput).

Each bench lives in its own module and registers its command on `bench_app`; add a module
and one import line below to add a bench.
"""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Measure the pipeline: memory, data and training throughput, the K-means tokenizer baseline",
                      no_args_is_help=True)


class BenchError(RuntimeError):
    """A dataset, split, grid or run a bench cannot use; the message says which and why. A bench raises
    it; the CLI turns it into ``error: message`` and exit 1 (`pipeline.cli.common.fail_on`)."""


from pipeline.bench import memory as _memory  # noqa: E402,F401 - registers `bench memory`
from pipeline.bench import data as _data  # noqa: E402,F401 - registers `bench data`
from pipeline.bench import train as _train  # noqa: E402,F401 - registers `bench train`
from pipeline.bench import tokenizer as _tokenizer  # noqa: E402,F401 - registers `bench tokenizer`
from pipeline.bench import codecs as _codecs  # noqa: E402,F401 - registers `bench codecs`
