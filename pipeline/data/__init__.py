"""Data layer: sources -> WebDataset shards + manifest -> per-rank streams of torch batches.

Names are imported lazily so that `pipeline data ...` commands do not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataError": "errors",
    "ShardError": "errors",
    "Split": "sources",
    "load_digits_splits": "sources",
    "load_mnist_splits": "sources",
    "load_binarized_mnist_splits": "binarized",
    "ShardInfo": "shards",
    "SplitInfo": "shards",
    "Manifest": "shards",
    "write_shards": "writer",
    "read_manifest": "shards",
    "shard_url": "shards",
    "rank_assignment": "stream",
    "steps_per_epoch": "stream",
    "ShardReader": "reader",
    "ReadOptions": "reader",
    "ReadStats": "stats",
    "SampleSpec": "contract",
    "SampleDecoder": "contract",
    "ImageTarget": "contract",
    "generate_deformed_mnist": "deformed",
    "train_batches": "stream",
    "TrainBatch": "stream",
    "partitions_of_rank": "stream",
    "eval_batches": "stream",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from pipeline.data.errors import DataError, ShardError
    from pipeline.data.shards import Manifest, ShardInfo, SplitInfo, read_manifest, shard_url
    from pipeline.data.writer import write_shards
    from pipeline.data.sources import Split, load_digits_splits, load_mnist_splits
    from pipeline.data.binarized import load_binarized_mnist_splits
    from pipeline.data.deformed import generate_deformed_mnist
    from pipeline.data.contract import ImageTarget, SampleDecoder, SampleSpec
    from pipeline.data.reader import ReadOptions, ShardReader
    from pipeline.data.stats import ReadStats
    from pipeline.data.stream import (
        TrainBatch, eval_batches, partitions_of_rank, rank_assignment, steps_per_epoch, train_batches,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    value = getattr(import_module(f"pipeline.data.{_EXPORTS[name]}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value
