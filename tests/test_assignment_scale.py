"""The sample-assignment function at cluster scale: up to 1M shards and 1024 workers.

Pure functions, no I/O: every sample of an epoch assigned exactly once, equal work per rank
in every global batch, deterministic, and loud about degenerate layouts."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import DataError, partitions_of_rank, steps_per_epoch
from pipeline.data.stream import epoch_order, partition_pieces, shard_layout_warning


def _check_exactly_once(sizes: np.ndarray, pieces: dict[int, list[tuple[int, int, int]]], partitions: int) -> None:
    covered = np.zeros(len(sizes), dtype=np.int64)
    shard = np.fromiter((p[0] for v in range(partitions) for p in pieces[v]), dtype=np.int64)
    start = np.fromiter((p[1] for v in range(partitions) for p in pieces[v]), dtype=np.int64)
    stop = np.fromiter((p[2] for v in range(partitions) for p in pieces[v]), dtype=np.int64)
    assert (start < stop).all() and (stop <= sizes[shard]).all()
    np.add.at(covered, shard, stop - start)
    assert (covered == sizes).all()  # each shard's samples covered exactly once in total...
    # ...and without overlap: within a shard the pieces tile [0, size) in partition order
    order = np.lexsort((start, shard))
    same = shard[order][1:] == shard[order][:-1]
    assert (start[order][1:][same] == stop[order][:-1][same]).all()
    counts = [sum(p[2] - p[1] for p in pieces[v]) for v in range(partitions)]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("num_shards,partitions", [(1_000_000, 1024), (1_000_000, 64), (10_000, 1024), (3, 8)])
def test_every_sample_once_and_balanced_at_scale(num_shards, partitions):
    sizes = np.random.default_rng(num_shards).integers(0, 5, num_shards)  # empty shards included
    order = epoch_order(num_shards, epoch=3, seed=42)
    pieces = partition_pieces(sizes, order, partitions)
    _check_exactly_once(sizes, pieces, partitions)
    # deterministic: the same inputs give the same assignment; another epoch another one
    assert partition_pieces(sizes, order, partitions, which=[0, partitions - 1]) == {
        0: pieces[0], partitions - 1: pieces[partitions - 1]}
    if num_shards > 100:
        assert not np.array_equal(order, epoch_order(num_shards, epoch=4, seed=42))


@pytest.mark.parametrize("world_size", [1, 2, 8, 64, 1024])
def test_every_rank_serves_an_equal_share_of_each_global_batch(world_size):
    partitions, global_batch = 1024, 4096
    served = [partitions_of_rank(partitions, world_size, rank) for rank in range(world_size)]
    assert sorted(v for rng in served for v in rng) == list(range(partitions))  # each partition to one rank
    per_rank = {len(rng) * (global_batch // partitions) for rng in served}
    assert per_rank == {global_batch // world_size}  # the same number of samples per rank per step
    assert steps_per_epoch(10_000_000, partitions, global_batch // partitions) == 10_000_000 // 1024 // 4


def test_too_few_shards_for_the_partitions_is_warned_about():
    assert "8 shards for 64 partitions" in shard_layout_warning(8, 64)
    assert shard_layout_warning(640, 64) is None


def test_degenerate_layouts_are_refused_with_the_reason():
    with pytest.raises(DataError, match="multiple of the number of workers"):
        partitions_of_rank(6, 4, 0)
    with pytest.raises(DataError, match="dataset too small"):
        steps_per_epoch(1000, 1024, 1)
