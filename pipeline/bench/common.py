"""Shared by `pipeline bench data` and `pipeline bench train`: the dataset, the machine, the README table.

A bench's dataset is either an existing shard dataset (a folder or URL with manifest.json),
MNIST idx files (a folder; default $PIPELINE_MNIST_DIR when set, first ``samples`` train images),
or ``digits`` (sklearn's bundled 8x8 digits: the small-data mode the tests use). Shards are
written with `pipeline.data.write_shards`, exactly as `pipeline data ...` writes them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

REPO = Path(__file__).resolve().parents[2]
MNIST_DIR_ENV = "PIPELINE_MNIST_DIR"  # a folder of MNIST's four idx files, when the machine has one
README = REPO / "docs" / "results" / "performance.md"  # where the bench tables live


# Options `bench data` and `bench train` share (one wording, one place).
SourceOption = Annotated[str, typer.Option("--source", help="Dataset URL/folder with manifest.json, an MNIST idx "
                                           "folder, or 'digits' (small)")]
SamplesOption = Annotated[int, typer.Option("--samples", min=0, help="Train samples taken from MNIST/digits (0: all)")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the report as JSON (default: a Markdown table)")]
ReadmeOption = Annotated[Optional[str], typer.Option("--readme", help="Also write the table into this README, between "
                                                     "its <!-- bench:NAME:start/end --> markers")]


def default_mnist() -> str | None:
    """$PIPELINE_MNIST_DIR when it holds MNIST's idx files, else None."""
    folder = os.environ.get(MNIST_DIR_ENV)
    return folder if folder and (Path(folder) / "train-images-idx3-ubyte.gz").exists() else None


def default_source() -> str:
    """MNIST from $PIPELINE_MNIST_DIR, else the bundled digits."""
    return default_mnist() or "digits"


def prepare_dataset(source: str, work: Path, samples: int, samples_per_shard: int = 5000) -> tuple[str, str]:
    """(dataset URL, a short description). An existing dataset is used as is."""
    from pipeline.data.shards import read_manifest

    if "://" in source or (Path(source) / "manifest.json").exists() or source.endswith(".json"):
        manifest = read_manifest(source)
        return source, f"{source} ({manifest.splits['train'].samples} train samples)"
    from pipeline.data import write_shards
    from pipeline.data.sources import Split

    if source == "digits":
        from pipeline.data import load_digits_splits

        splits, name = load_digits_splits(), "sklearn digits 8x8"
    else:
        from pipeline.data import load_mnist_splits

        splits, name = load_mnist_splits(source), "MNIST 28x28"
    train = splits["train"]
    n = min(samples, len(train)) if samples else len(train)
    splits = {"train": Split(train.images[:n], train.labels[:n]), "val": splits["val"]}
    out = work / "data"
    write_shards(splits, str(out), source=f"bench:{source}", samples_per_shard=samples_per_shard, progress=False)
    return str(out), f"{name}, {n} train samples in shards of {min(samples_per_shard, n)}"


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
            "loadavg_1m": round(load[0], 2), "host": platform.node()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    args = [a for a in sys.argv[1:]]
    return "pipeline " + " ".join(shlex.quote(a) for a in args) if args else "pipeline"


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b and b == b and a == a else None


class Stopwatch:
    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def write_readme_section(name: str, markdown: str, readme: Path = README) -> None:
    """Replace the text between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` in the README."""
    text = readme.read_text()
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    readme.write_text(pattern.sub(lambda _: block, text, count=1))


def emit(report: dict[str, Any], as_json: bool, markdown: str, readme: str | None, name: str) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown)
    if readme:
        write_readme_section(name, markdown, Path(readme))
