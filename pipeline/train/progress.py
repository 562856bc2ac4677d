"""Training progress: a live line on the user's terminal, drawn by the driver from what rank 0 reports.

Why the driver draws it: Ray workers do not write to the user's terminal. Their stdout is a log file
that Ray forwards to the driver line by line, each line prefixed with the worker's pid, so a line a
worker redraws in place (``\\r``) would arrive as a stream of separate lines, if at all. So:

- The driver decides, once, whether there is a live line (`wants_progress`: the ``progress`` argument
  of `pipeline.train.trainer.train` or ``pipeline train --progress/--no-progress``, else
  $PIPELINE_PROGRESS, else whether the driver's stdout is a terminal). Workers never ask their own
  stdout, which is never a terminal.
- With a live line, the driver starts a `ProgressBoard` (a named Ray actor that holds no CPU) and
  sends its name to the workers in `WorkerArgs.progress`. Rank 0's `ProgressReporter` posts a
  `Snapshot` to it at most twice a second: a fire-and-forget call, no collective, nothing any other
  rank waits for. `live_progress` polls the board and redraws one line with rich's `Live`, which
  prints Ray's forwarded worker lines (the per-epoch lines among them) above it.
- Without one (CI, logs, `pipeline submit`, sweep trials), nothing of this runs: the output is rank
  0's per-epoch lines, as ever.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, TextIO

NAMESPACE = "pipeline"  # the boards' Ray namespace: rank 0 finds the driver's board by name
ENV = "PIPELINE_PROGRESS"  # 1 or 0: force the live line on or off (the CLI flag sets it)
SEND_EVERY_S = 0.5  # rank 0 posts at most this often (and at each epoch's last step)


@dataclass
class Snapshot:
    """Where training stands, as rank 0 posts it (plain data: it crosses process boundaries)."""

    epoch: int  # 1-based
    epochs: int
    step: int  # steps done in this epoch
    steps: int  # steps per epoch
    samples_per_s: float  # global samples per second since rank 0's previous post
    loss: float  # the mean of rank 0's step losses (train -ELBO) since its previous post
    eta_s: float | None  # `eta_seconds`; None until this worker group has a rate


def eta_seconds(steps_done: int, elapsed_s: float, steps_left: int) -> float | None:
    """Seconds left at this worker group's average pace: ``steps_left`` x ``elapsed_s`` / ``steps_done``.

    ``steps_done`` and ``elapsed_s`` count from the end of this worker group's first step (its warm-up
    left out) and include what steps do not (validation, checkpoints), so the estimate covers them too.
    A restarted or resumed worker group starts its own count. None before there is a pace to go by."""
    if steps_done <= 0 or elapsed_s <= 0:
        return None
    return max(steps_left, 0) * elapsed_s / steps_done


def format_duration(seconds: float | None) -> str:
    """0:42, 12:05, 3:02:09; ``--:--`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(snap: Snapshot) -> str:
    """``epoch 2/40  step 13/20  5,120 samples/s  loss 41.873  ETA 0:57``."""
    return (f"epoch {snap.epoch}/{snap.epochs}  step {snap.step}/{snap.steps}  "
            f"{snap.samples_per_s:,.0f} samples/s  loss {snap.loss:.3f}  ETA {format_duration(snap.eta_s)}")


def wants_progress(flag: bool | None, stream: TextIO | None = None) -> bool:
    """The driver's decision: ``flag`` if given, else $PIPELINE_PROGRESS (1 or 0), else whether ``stream``
    (default stdout) is a terminal."""
    if flag is not None:
        return flag
    setting = os.environ.get(ENV, "").strip().lower()
    if setting:
        return setting not in ("0", "false", "no", "off")
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class ProgressReporter:
    """Rank 0's side: counts steps and posts a `Snapshot` to the driver's board now and then."""

    def __init__(self, board: Any, *, steps: int, epochs: int, global_batch: int) -> None:
        self.board, self.steps, self.epochs, self.global_batch = board, steps, epochs, global_batch
        self.clock_from: float | None = None  # the end of this worker group's first step
        self.group_steps = 0  # steps done since then
        self.sent_at = time.perf_counter()
        self.losses: list[float] = []  # since the last post

    @classmethod
    def connect(cls, board_name: str, **kwargs: Any) -> "ProgressReporter | None":
        """The reporter for the driver's board ``board_name``; None (no live line) when it is gone."""
        import ray

        try:
            return cls(ray.get_actor(board_name, namespace=NAMESPACE), **kwargs)
        except ValueError:
            return None

    def step(self, epoch: int, step_in_epoch: int, global_step: int, loss: float) -> None:
        """One step done (``step_in_epoch`` and ``global_step`` count it); posts when one is due."""
        now = time.perf_counter()
        if self.clock_from is None:
            self.clock_from = now
        else:
            self.group_steps += 1
        self.losses.append(loss)
        due = now - self.sent_at >= SEND_EVERY_S or step_in_epoch == self.steps or self.group_steps == 0
        if not due:  # this worker group's first step and each epoch's last always go out
            return
        steps_left = self.steps * self.epochs - global_step
        self.board.update.remote(Snapshot(
            epoch=epoch + 1, epochs=self.epochs, step=step_in_epoch, steps=self.steps,
            samples_per_s=len(self.losses) * self.global_batch / max(now - self.sent_at, 1e-9),
            loss=sum(self.losses) / len(self.losses),
            eta_s=eta_seconds(self.group_steps, now - self.clock_from, steps_left)))
        self.sent_at, self.losses = now, []


class ProgressBoard:
    """The latest `Snapshot` (a Ray actor in the driver's run: rank 0 writes, the driver reads)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def update(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def latest(self) -> Snapshot | None:
        return self.snapshot


@contextlib.contextmanager
def live_progress(enabled: bool, *, refresh_s: float = 0.25) -> Iterator[str | None]:
    """With ``enabled``, a board for rank 0 and a live line on stdout until the block ends; yields the
    board's name (`WorkerArgs.progress`), else None and draws nothing. Ray must be connected."""
    if not enabled:
        yield None
        return
    import ray
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    name = f"progress-{uuid.uuid4().hex[:12]}"
    board = ray.remote(num_cpus=0)(ProgressBoard).options(name=name, namespace=NAMESPACE).remote()
    console = Console(file=sys.stdout, force_terminal=True)  # the decision is made: draw, even into a pipe
    done, drawn = threading.Event(), [None]

    def draw(live: Live) -> None:
        with contextlib.suppress(Exception):  # a late or lost board only leaves the line as it was
            snapshot = ray.get(board.latest.remote(), timeout=5)
            if snapshot is not None and snapshot != drawn[0]:  # redrawn only when rank 0 said something new
                live.update(Text(progress_line(snapshot)), refresh=True)
                drawn[0] = snapshot

    def poll(live: Live) -> None:
        while not done.wait(refresh_s):
            draw(live)

    with Live(Text("starting workers"), console=console, auto_refresh=False, transient=False) as live:
        poller = threading.Thread(target=poll, args=(live,), name="progress-line", daemon=True)
        poller.start()
        try:
            yield name
        finally:
            done.set()
            poller.join()
            draw(live)  # the last word: the final step
            with contextlib.suppress(Exception):
                ray.kill(board)
