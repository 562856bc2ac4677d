"""Errors raised by the data layer. Every message says which file is at fault."""

from __future__ import annotations


class DataError(Exception):
    """A dataset, manifest or source file that cannot be used; the message names it."""


class ShardError(DataError):
    """A shard that is corrupt, truncated, unsafe or disagrees with its manifest.

    The message always names the shard URL and, when known, the tar member or sample key,
    so a failed epoch on a cluster points straight at the file to inspect or rewrite.
    """

    def __init__(self, shard: str, problem: str, member: str | None = None, key: str | None = None) -> None:
        # All four go into args so the exception survives pickling (Ray ships worker errors to the driver).
        super().__init__(shard, problem, member, key)
        self.shard = shard
        self.problem = problem
        self.member = member
        self.key = key

    def __str__(self) -> str:
        where = f"shard {self.shard}"
        if self.member is not None:
            where += f", member {self.member}"
        if self.key is not None:
            where += f", sample {self.key}"
        return f"{where}: {self.problem}"
