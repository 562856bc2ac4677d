"""Rank 0's asynchronous MLflow logger, the rows it could not deliver yet, and their replay.

Everything rank 0 says to MLflow during training (metrics, tags, the restart count) becomes a
*row* (a JSON-able dict) in one ordered list; a background thread delivers the list front to
back. A row leaves the list only once MLflow has it, so the list is always exactly what the
run still lacks. That list is what makes recovery exact:

- before every checkpoint, `save_pending` writes it into the checkpoint folder, so a checkpoint
  is never ahead of the metrics it covers: a restored rank 0 delivers them first
  (`pending=load_pending(checkpoint)`), then what it trains after the checkpoint;
- `close` waits for it to empty and writes what is left to a JSONL fallback file that
  `pipeline replay-metrics FILE` delivers later (same row format).

Training never waits on MLflow: `log_metrics`, `set_tags` and `count_restart` only append.
After a restart, a metric step the run already holds is not sent again (MLflow would keep
both values): the thread reads each metric's last step from the run before its first write.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from pipeline.data.retry import RetryPolicy
from pipeline.runs.store import MAX_METRICS_PER_BATCH, MAX_TAG_CHARS, MAX_TAGS_PER_BATCH, count_restart

PENDING_FILE = "mlflow-pending.jsonl"  # inside a checkpoint folder
# {"key", "value", "timestamp", "step"} | {"tag", "value"} | {"restart": reason, "id"} | {"image": key, "step", "png"}
Row = dict[str, Any]


def metric_rows(metrics: dict[str, float], step: int) -> list[Row]:
    now = int(time.time() * 1000)
    return [{"key": key, "value": float(value), "timestamp": now, "step": int(step)} for key, value in metrics.items()]


class _RunWriter:
    """One run's rows into MLflow: metric dedup by last held step, tags, restart counting."""

    def __init__(self, client: MlflowClient, run_id: str, *, resumed: bool) -> None:
        self.client, self.run_id = client, run_id
        self.held: dict[str, int] | None = None if resumed else {}  # None: read from the run first
        self.held_images: set[tuple[str, int]] = set()  # (key, step) of images the run has

    def _read_held(self) -> dict[str, int]:
        run = self.client.get_run(self.run_id)
        return {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                for key in run.data.metrics}

    def write(self, rows: list[Row]) -> None:
        """Deliver ``rows`` (all, or raise: the caller retries the same rows). Metric steps held
        are recorded after each request, so a retry after a partial write sends no step twice."""
        if self.held is None:
            self.held = self._read_held()
            self.held_images = self._read_held_images()
        for segment in segments(rows):
            if "restart" in segment[0]:
                self._count_restart(segment[0])
                continue
            if "image" in segment[0]:
                self._log_image(segment[0])
                continue
            tags = [RunTag(row["tag"], str(row["value"])) for row in segment if "tag" in row]
            for start in range(0, len(tags), MAX_TAGS_PER_BATCH):  # tags are idempotent: resending is harmless
                self.client.log_batch(self.run_id, tags=tags[start : start + MAX_TAGS_PER_BATCH])
            metrics, held = [], dict(self.held)
            for row in segment:
                if "key" in row and row["step"] > held.get(row["key"], -1):  # not already in the run
                    held[row["key"]] = row["step"]
                    metrics.append(Metric(row["key"], row["value"], row["timestamp"], row["step"]))
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                chunk = metrics[start : start + MAX_METRICS_PER_BATCH]
                self.client.log_batch(self.run_id, metrics=chunk)
                for metric in chunk:
                    self.held[metric.key] = metric.step

    def _read_held_images(self) -> set[tuple[str, int]]:
        # MLflow names a stepped image images/<key, '/' as '~'>+step+<step>+timestamp+...
        held = set()
        for artifact in self.client.list_artifacts(self.run_id, "images"):
            found = re.match(r"images/(.+?)\+step\+(\d+)\+", artifact.path)
            if found:
                held.add((found.group(1).replace("~", "/"), int(found.group(2))))
        return held

    def _log_image(self, row: Row) -> None:
        """One image at its step (MLflow's image slider); a restored rank 0 does not log it twice."""
        from PIL import Image

        if (row["image"], row["step"]) in self.held_images:
            return
        image = Image.open(io.BytesIO(base64.b64decode(row["png"])))
        self.client.log_image(self.run_id, image, key=row["image"], step=row["step"], synchronous=True)
        self.held_images.add((row["image"], row["step"]))

    def _count_restart(self, row: Row) -> None:
        """+1 on `restarts`, once per restart row (its id: `pipeline.runs.store.count_restart`)."""
        count_restart(self.client, self.run_id, row["restart"], row["id"])


def segments(rows: list[Row]) -> list[list[Row]]:
    """Rows cut at restart and image rows: each is a request of its own, never resent after it
    succeeded (the sender drops each segment once delivered)."""
    out: list[list[Row]] = []
    for row in rows:
        if "restart" in row or "image" in row or not out or "restart" in out[-1][0] or "image" in out[-1][0]:
            out.append([row])
        else:
            out[-1].append(row)
    return out


class RunLogger:
    """Rank 0's handle on the run; see the module docstring. Thread-safe appends, one sender."""

    def __init__(self, tracking_uri: str, run_id: str, *, resumed: bool = False, fallback_dir: str | None = None,
                 pending: Iterable[Row] = (), max_backoff_s: float = 10.0, min_interval_s: float = 1.0) -> None:
        # MLflow's own HTTP retries would block our thread for minutes; we retry ourselves.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.tracking_uri, self.run_id, self.fallback_dir = tracking_uri, run_id, fallback_dir
        self.max_backoff_s, self.min_interval_s = max_backoff_s, min_interval_s
        self._writer = _RunWriter(MlflowClient(tracking_uri), run_id, resumed=resumed)
        self.late_batches = 0  # writes delivered only after at least one failed attempt
        self.failed_attempts = 0
        self._rows: deque[Row] = deque(pending)  # undelivered, oldest first: a checkpoint's pending rows lead
        self._changed = threading.Condition()
        self._closing, self._deadline = False, 0.0
        self._thread = threading.Thread(target=self._deliver, name="mlflow-logger", daemon=True)
        self._thread.start()

    # --- what the training loop calls: appends only, never a request ------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._append(metric_rows(metrics, step))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._append([{"tag": key, "value": str(value)} for key, value in tags.items()])

    def log_image(self, key: str, image: Any, step: int) -> None:
        """A PIL image under ``key`` at ``step`` (e.g. a reconstruction grid per epoch), PNG-encoded now."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self._append([{"image": key, "step": int(step), "png": base64.b64encode(buffer.getvalue()).decode("ascii")}])

    def count_restart(self, reason: str) -> None:
        """Increment the run's `restarts` tag (and set `last_restart`) when MLflow can be reached."""
        self._append([{"restart": reason, "id": uuid.uuid4().hex[:12]}])

    def _append(self, rows: list[Row]) -> None:
        with self._changed:
            self._rows.extend(rows)
            self._changed.notify()

    def pending(self) -> list[Row]:
        """What MLflow does not have yet (rows being sent included: a resend is deduplicated)."""
        with self._changed:
            return list(self._rows)

    def save_pending(self, directory: str | Path) -> None:
        """Into a checkpoint folder, before the checkpoint is reported (see the module docstring)."""
        rows = self.pending()
        if rows:
            (Path(directory) / PENDING_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))

    # --- the sender thread ----------------------------------------------------------------------

    def _deliver(self) -> None:
        """Send everything queued in one go, at most one write per `min_interval_s`: each write
        (sqlite or HTTP) costs this process Python time next to the training thread."""
        last_write = 0.0
        while True:
            with self._changed:
                while not self._rows and not self._closing:
                    self._changed.wait()
                if not self._rows:
                    return
                until = last_write + self.min_interval_s
                while not self._closing and (left := until - time.monotonic()) > 0:
                    self._changed.wait(left)  # appends wake us too: keep waiting; close() ends the pause
                batch = list(self._rows)
            for segment in segments(batch):
                if not self._send(segment):
                    return  # closing and out of time: close() writes the rest to the fallback file
                with self._changed:
                    for _ in segment:
                        self._rows.popleft()
            last_write = time.monotonic()

    def _send(self, rows: list[Row]) -> bool:
        failed = False

        def count(_err: BaseException) -> None:
            nonlocal failed
            failed = True
            self.failed_attempts += 1

        def give_up() -> bool:
            return self._closing and time.monotonic() > self._deadline

        # Any error, retried until the close deadline: exponential backoff from 0.5 s (never less) up to max_backoff_s.
        policy = RetryPolicy(retries=None, backoff_s=0.5, max_backoff_s=max(0.5, self.max_backoff_s), jitter=False)
        try:
            policy.retrying(on_retry=count, give_up=give_up)(self._writer.write, rows)
        except Exception:  # noqa: BLE001 - still unreachable at the close deadline
            self.failed_attempts += 1
            return False
        self.late_batches += failed
        return True

    def close(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Deliver what is queued (waiting up to ``timeout_s``); returns a delivery report."""
        with self._changed:
            self._deadline = time.monotonic() + timeout_s
            self._closing = True
            self._changed.notify()
        self._thread.join()
        report: dict[str, Any] = {"late_batches": self.late_batches, "failed_attempts": self.failed_attempts}
        with self._changed:
            left, self._rows = list(self._rows), deque()
        if left:
            report["fallback_file"] = self._write_fallback(left)
        return report

    def _write_fallback(self, rows: list[Row]) -> str:
        folder = Path(self.fallback_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"mlflow-pending-{self.run_id}.jsonl"
        with path.open("a") as out:
            for row in rows:
                out.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri, **row}) + "\n")
        return str(path.resolve())


def load_pending(checkpoint: Any) -> list[Row]:
    """The rows a checkpoint carries (a `ray.train.Checkpoint`, a folder, or None)."""
    if checkpoint is None:
        return []
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint) / PENDING_FILE
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    with checkpoint.as_directory() as directory:
        return load_pending(directory)


def replay_metrics(path: str | Path, tracking_uri: str | None = None) -> int:
    """Deliver a fallback file's rows (metrics, tags, restart counts); returns how many rows.

    Metric steps the run already holds are skipped, so replaying a file twice adds nothing."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    by_target: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        target = (tracking_uri or row.pop("tracking_uri"), row.pop("run_id"))
        row.pop("tracking_uri", None)
        by_target.setdefault(target, []).append(row)
    for (uri, run_id), target_rows in by_target.items():
        _RunWriter(MlflowClient(uri), run_id, resumed=True).write(target_rows)
    return len(rows)


def log_data_health(logger: RunLogger, step: int, metrics: dict[str, float], skipped_shards: Any = ()) -> None:
    """Data-layer health on rank 0: ``data/skipped_samples``, ``data/read_retries``, cache hits/misses
    (a worker's `pipeline.data.stats.ReadStats`, summed over ranks by the caller), and the tag
    ``data.skipped_shards`` listing every shard with skipped samples (URLs; MLflow caps tags at 5000 chars)."""
    logger.log_metrics(metrics, step)
    names = sorted(set(skipped_shards))
    if names:
        listed = ", ".join(names)
        logger.set_tags({"data.skipped_shards": listed if len(listed) <= MAX_TAG_CHARS else listed[:MAX_TAG_CHARS - 20] + f" ... ({len(names)} shards)"})
