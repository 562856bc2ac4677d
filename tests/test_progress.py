"""Training progress: the live line's content and ETA, who decides to draw it, and a real `pipeline train`
with the line forced on (as on a terminal). Left to decide with stdout not a terminal (per-epoch lines
only): tests/test_train.py::test_cli_trains_digits_on_two_workers."""

from __future__ import annotations

import io
import re

import pytest

from pipeline.train import progress
from pipeline.train.progress import ProgressReporter, Snapshot, eta_seconds, format_duration, progress_line

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_eta_is_the_steps_left_at_this_worker_groups_pace() -> None:
    assert eta_seconds(steps_done=10, elapsed_s=5.0, steps_left=30) == pytest.approx(15.0)
    assert eta_seconds(steps_done=10, elapsed_s=5.0, steps_left=0) == 0.0
    assert eta_seconds(steps_done=0, elapsed_s=5.0, steps_left=30) is None  # no pace yet
    assert eta_seconds(steps_done=3, elapsed_s=0.0, steps_left=30) is None


def test_durations_and_the_line() -> None:
    assert [format_duration(s) for s in (0, 42.4, 725, 10929, None, float("nan"))] == [
        "0:00", "0:42", "12:05", "3:02:09", "--:--", "--:--"]
    snap = Snapshot(epoch=2, epochs=40, step=13, steps=20, samples_per_s=5120.4, loss=41.8734, eta_s=57.2)
    assert progress_line(snap) == "epoch 2/40  step 13/20  5,120 samples/s  loss 41.873  ETA 0:57"
    assert progress_line(Snapshot(1, 3, 1, 20, 64.0, 80.0, None)).endswith("ETA --:--")


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_the_driver_decides_flag_then_environment_then_terminal(monkeypatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.wants_progress(None, _Stream(tty=True)) is True
    assert progress.wants_progress(None, _Stream(tty=False)) is False
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.wants_progress(None, _Stream(tty=False)) is True
    monkeypatch.setenv(progress.ENV, "0")
    assert progress.wants_progress(None, _Stream(tty=True)) is False
    assert progress.wants_progress(True, _Stream(tty=False)) is True  # the flag beats the variable
    with progress.live_progress(False) as board:  # no live line: no board, nothing drawn, Ray not needed
        assert board is None


class _Board:
    """Stands in for the Ray actor: records what rank 0 posts."""

    def __init__(self) -> None:
        self.posted: list[Snapshot] = []
        self.update = self  # board.update.remote(snapshot)

    def remote(self, snapshot: Snapshot) -> None:
        self.posted.append(snapshot)


def test_rank_0_posts_now_and_then_with_speed_loss_and_eta(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    board = _Board()
    reporter = ProgressReporter(board, steps=4, epochs=2, global_batch=64)
    for global_step, loss in enumerate([9.0, 8.0, 7.0, 6.0, 5.0], start=1):
        clock[0] += 0.3 if global_step > 1 else 2.0  # the first step carries the warm-up
        reporter.step((global_step - 1) // 4, (global_step - 1) % 4 + 1, global_step, loss)
    # step 1 (the group's first), step 3 (0.6 s after the last post), step 4 (the epoch's last);
    # steps 2 and 5 wait (0.3 s since the last post, not an epoch's last step).
    assert [(s.epoch, s.step) for s in board.posted] == [(1, 1), (1, 3), (1, 4)]
    first, second, last = board.posted
    assert first.eta_s is None and first.loss == 9.0 and first.samples_per_s == pytest.approx(64 / 2.0)
    assert second.loss == pytest.approx(7.5) and second.samples_per_s == pytest.approx(2 * 64 / 0.6)
    # 3 steps in 0.9 s since the first ended, 4 of 8 steps left.
    assert last.eta_s == pytest.approx(4 * 0.9 / 3) and last.steps == 4 and last.epochs == 2


LIVE_LINE = r"epoch (\d+)/\d+  step (\d+)/\d+  [\d,]+ samples/s  loss [\d.]+  ETA [\d:-]+"


@pytest.mark.timeout(400)
def test_train_with_progress_forced_draws_the_live_line(digits_progress_run) -> None:
    """`pipeline train --progress` in this process, on the session's Ray cluster (tests/conftest.py: 2 epochs
    of digits): its stdout is not a terminal, and the flag draws the line all the same, as it would on one."""
    result = digits_progress_run["result"]
    if result.exit_code != 0:
        import traceback

        raise AssertionError(result.output[-4000:] + "".join(traceback.format_exception(*result.exc_info)))
    assert "\x1b[2K" in result.output  # a line erased and redrawn in place
    text = ANSI.sub("", result.output).replace("\r", "\n")
    # The line's last word: every step of the last epoch done, nothing left.
    assert re.search(r"epoch 2/2  step (\d+)/\1  [\d,]+ samples/s  loss [\d.]+  ETA 0:00", text), text[-3000:]
    assert "[rank 0] epoch 1/2 step" in text and "[rank 0] epoch 2/2 step" in text  # the per-epoch lines print above it


# Not on a terminal (the driver left to decide, stdout a pipe): tests/test_train.py::
# test_cli_trains_digits_on_two_workers checks `pipeline train`'s output has the per-epoch lines and no live line.
