"""Progress display without a terminal: plain lines, with the time left on long sweeps."""

from __future__ import annotations

import pytest

import guessgrad.cli.progress as progress
from guessgrad.cli.progress import SweepProgress, _duration


def test_a_sweep_without_terminal_prints_each_twentieth_with_the_time_left(
    capsys, monkeypatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    sweep = SweepProgress(quiet=False)
    sweep.phase("training", 2, 400, "epoch")
    for _ in range(100):  # 6 s per epoch
        clock[0] += 6.0
        sweep.advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "training: 2 runs, 400 epochs"
    assert len(lines) == 1 + 5  # at 20, 40, 60, 80 and 100 epochs
    assert lines[-1] == "training: 100/400 epochs (25%), 10 min elapsed, about 30 min left"
    for _ in range(300):
        clock[0] += 6.0
        sweep.advance()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 14  # 120, …, 380: the end itself is told by the tasks' own lines
    assert lines[-1] == "training: 380/400 epochs (95%), 38 min elapsed, about 2 min left"


def test_measurements_and_quiet_sweeps_print_no_such_lines(capsys) -> None:
    sweep = SweepProgress(quiet=False)
    sweep.phase("measuring", 3, 3, "task")
    for _ in range(3):
        sweep.advance()
    quiet = SweepProgress(quiet=True)
    quiet.phase("training", 1, 40, "epoch")
    for _ in range(40):
        quiet.advance()
    one = SweepProgress(quiet=False)
    one.phase("training", 1, 1, "epoch")
    assert capsys.readouterr().err.splitlines() == [
        "measuring: 3 measurements",
        "training: 1 run, 1 epoch",
    ]


def test_durations_read_as_seconds_minutes_hours() -> None:
    assert [_duration(s) for s in (45, 61, 719.9, 3600, 11100)] == [
        "45 s",
        "1 min",
        "12 min",
        "1 h 00 min",
        "3 h 05 min",
    ]


def test_train_lines_give_the_step_rate_and_none_from_a_single_resumed_step(capsys) -> None:
    """Plain lines (no terminal): steps per second of training time; a run resumed with one
    step per epoch cannot time that step (its start is unknown) and says so, not 0.0."""
    from guessgrad.cli.progress import TrainProgress

    def line(epoch: int, wall: float) -> dict:
        return {
            "epoch": epoch,
            "train_loss": 1.0,
            "train_accuracy": 0.5,
            "test_accuracy": 0.4,
            "wall_seconds": wall,
        }

    fresh = TrainProgress(2, 4, quiet=False, desc="run")
    for _ in range(4):
        fresh.on_step(0, 1.0)
    fresh.on_epoch(line(1, 2.0))  # 4 steps in 2 s of training
    resumed = TrainProgress(3, 1, quiet=False, desc="run")
    resumed.on_step(0, 1.0)
    resumed.on_epoch(line(3, 9.0))
    out = capsys.readouterr().err.splitlines()
    assert "  2.0 steps/s" in out[0] and out[1].endswith("– steps/s")  # epoch 3/3: no time left


def test_train_lines_estimate_the_time_left_from_the_epochs_run_in_this_process(
    capsys, monkeypatch
) -> None:
    """Resumed after epoch 40 of 100 at clock 100 s, epoch 45 ends at 200 s: 20 s per epoch,
    55 epochs left, about 18 min (evaluation included: the clock, not the training time);
    a fresh run without ``on_start`` counts from its creation; the last line has no estimate,
    and one under half a second says so."""
    from guessgrad.cli.progress import TrainProgress

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    display = TrainProgress(100, 2, quiet=False, desc="run")  # created at 0 s
    now[0] = 100.0
    display.on_start(40)
    now[0] = 200.0
    display.on_epoch(_epoch_line(45))
    now[0] = 1000.0
    display.on_epoch(_epoch_line(100))
    now[0] = 0.0
    fresh = TrainProgress(20, 2, quiet=False, desc="run")
    quick = TrainProgress(3, 2, quiet=False, desc="run")
    now[0] = 30.0
    fresh.on_epoch(_epoch_line(1))  # 19 epochs of 30 s left
    now[0] = 0.01
    quick.on_epoch(_epoch_line(1))  # 2 epochs of 10 ms left
    out = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("note:")]
    assert out[0].startswith("epoch 45/100") and out[0].endswith(", about 18 min left")
    assert out[1].startswith("epoch 100/100") and out[1].endswith(" steps/s")
    assert out[2].startswith("epoch 1/20") and out[2].endswith(", about 10 min left")
    assert out[3].startswith("epoch 1/3") and out[3].endswith(", under a second left")


def _epoch_line(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0,
        "train_accuracy": 0.5,
        "test_accuracy": 0.4,
        "wall_seconds": float(epoch),
    }


def test_train_prints_about_twenty_lines_without_a_terminal(capsys) -> None:
    """100 epochs: the first, then every fifth (a twentieth of the run), the last once."""
    from guessgrad.cli.progress import TrainProgress

    display = TrainProgress(100, 2, quiet=False, desc="run")
    for epoch in range(1, 101):
        display.on_epoch(_epoch_line(epoch))
    display.close()
    printed = [int(ln.split()[1].split("/")[0]) for ln in capsys.readouterr().err.splitlines()]
    assert printed == [1, *range(5, 101, 5)]


def test_a_sweep_on_a_terminal_tallies_its_tasks_beside_the_bar(monkeypatch) -> None:
    from guessgrad.experiments.runner import Outcome

    class Task:
        def label(self) -> str:
            return "W̃ᵀ w64 s0"

    monkeypatch.setattr(progress, "_is_terminal", lambda stream: True)
    sweep = SweepProgress(quiet=False)
    sweep.phase("training", 1, 300, "epoch")
    assert sweep.bar is not None and sweep.bar.postfix == "0/1 run done"
    sweep.finished(Outcome(Task(), "done", result={}, seconds=1.0))  # type: ignore[arg-type]
    assert sweep.bar.postfix == "1/1 run done"
    sweep.phase("measuring", 3, 3, "task")
    assert sweep.bar.postfix == "0/3 measurements done"
    sweep.close()


def test_train_on_a_terminal_shows_a_bar_at_the_run_s_epoch_and_quiet_shows_nothing(
    capsys, monkeypatch
) -> None:
    """On a terminal, a bar of the run's epochs: a run resumed at epoch 40 stands at 41 after
    its first epoch, not at 1; with ``quiet``, no bar and no line, terminal or not."""
    from guessgrad.cli.progress import TrainProgress

    monkeypatch.setattr(progress, "_is_terminal", lambda stream: True)
    display = TrainProgress(100, 2, quiet=False, desc="run")
    assert display.bar is not None
    display.on_epoch(_epoch_line(41))
    assert display.bar.n == 41
    display.on_epoch(_epoch_line(42))
    assert display.bar.n == 42
    display.close()
    capsys.readouterr()
    for terminal in (True, False):
        monkeypatch.setattr(progress, "_is_terminal", lambda stream, t=terminal: t)
        quiet = TrainProgress(100, 2, quiet=True, desc="run")
        assert quiet.bar is None
        for epoch in (1, 5, 100):
            quiet.on_epoch(_epoch_line(epoch))
        quiet.close()
    assert capsys.readouterr().err == ""


def test_a_resumed_train_says_where_it_starts_and_its_bar_starts_there(capsys, monkeypatch) -> None:
    from guessgrad.cli.progress import TrainProgress

    note = "note: resuming from the checkpoint after epoch 40 of 100"
    for terminal in (False, True):
        monkeypatch.setattr(progress, "_is_terminal", lambda stream, t=terminal: t)
        display = TrainProgress(100, 2, quiet=False, desc="run")
        display.on_start(0)  # a fresh run: nothing to say
        assert note not in capsys.readouterr().err
        display.on_start(40)
        if terminal:
            assert display.bar is not None and display.bar.n == display.bar.initial == 40
            ticks = iter([3.0])  # the bar's clock: 2 s for epoch 41
            monkeypatch.setattr(display.bar, "_time", lambda ticks=ticks: next(ticks, 3.0))
            display.bar.start_t = display.bar.last_print_t = 1.0
            display.on_epoch(_epoch_line(41))
            assert display.bar.format_dict["rate"] == pytest.approx(0.5)  # not 41 epochs in 2 s
        display.close()
        assert note in capsys.readouterr().err
    quiet = TrainProgress(100, 2, quiet=True, desc="run")
    quiet.on_start(40)
    assert capsys.readouterr().err == ""
