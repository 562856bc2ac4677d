"""Hooks the tests install into `pipeline encode`'s tasks (pipeline/tokens/encode.py): each task loads
this file by its path, so they reach Ray workers of any process on this machine.

- `stall_mid_write(shard, marker)`: the sample stream of token shard ``shard`` stalls (for an hour)
  as soon as part of that shard is on disk, wherever the task writes it (its staged file under
  ``OUT/_tmp/`` or its final name), after writing ``marker``: a JSON of the task's pid, the file
  and its size then.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.tokens.encode import HOOKS_ENV
from pipeline.train.hooks import environment

HERE = str(Path(__file__).resolve())


def stall_mid_write(shard: str, marker: str | Path) -> dict[str, Any]:
    return {"factory": f"{HERE}:stall", "args": {"shard": shard, "marker": str(Path(marker).resolve())}}


def env(*specs: dict[str, Any]) -> dict[str, str]:
    """The environment that installs ``specs`` in an encode started from it (this process or a subprocess)."""
    return environment(*specs, variable=HOOKS_ENV)


def _bytes_on_disk(out: Path, shard: str) -> tuple[Path, int] | None:
    """A file of ``shard`` (staged or final) with bytes in it."""
    for path in [out / shard, *sorted((out / "_tmp").glob(f"{shard}.*"))]:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if size > 0:
            return path, size
    return None


def stall(out_url: str, shard_path: str, *, shard: str, marker: str) -> Any:
    if shard_path != shard:
        return None
    out = Path(out_url)

    def stream(samples: Iterator[tuple[str, dict[str, bytes]]]) -> Iterator[tuple[str, dict[str, bytes]]]:
        for count, sample in enumerate(samples):
            found = _bytes_on_disk(out, shard)
            if found is not None:
                partial = Path(f"{marker}.partial")
                partial.write_text(json.dumps({"pid": os.getpid(), "file": str(found[0]), "bytes": found[1],
                                               "samples": count}))
                partial.rename(marker)
                time.sleep(3600)  # in flight, part written, until the test kills the run
            yield sample

    return stream
