"""Progress display: a tqdm bar on a terminal, plain lines otherwise, nothing when quiet.

Progress goes to stderr; results (summaries, tables) go to stdout.  Without a terminal (a log
file, a batch job) a sweep prints a line per finished task and, in between, one each time
another twentieth of its training epochs is done, with the time elapsed and an estimate of the
time left (from the sweep's mean rate so far); ``train`` prints about twenty lines per run, each
with the step rate and the time left (from the mean time of the epochs run in this process).
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from ..text import counted

if TYPE_CHECKING:
    from ..experiments.runner import Outcome

__all__ = ["TrainProgress", "SweepProgress"]


def _is_terminal(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


class TrainProgress:
    """Per-epoch progress of one training run (``train``'s ``on_epoch``/``on_step``)."""

    def __init__(self, epochs: int, steps_per_epoch: int, *, quiet: bool, desc: str) -> None:
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.stream = sys.stderr
        self.quiet = quiet
        self.every = max(1, math.ceil(epochs / 20))  # plain lines: about 20 per run
        self.bar: tqdm | None = None
        if not quiet and _is_terminal(self.stream):
            self.bar = tqdm(total=epochs, desc=desc, unit="epoch", file=self.stream)
        self._wall: float | None = None  # training time at the previous epoch's end
        self._first_step: float | None = None
        self._steps = 0
        # where this process's training started (clock, epochs done): the time left is
        # estimated from the epochs run here, evaluation and checkpoints included
        self._began: tuple[float, int] | None = None
        self._created = time.perf_counter()

    def on_step(self, _step: int, _loss: object) -> None:
        if self._first_step is None:
            self._first_step = time.perf_counter()
        self._steps += 1

    def on_epoch(self, line: dict[str, Any]) -> None:
        epoch = line["epoch"]
        if self._wall is None and epoch > 1:  # resumed: time this epoch's steps directly,
            # from the end of the first (whose start is unknown): no rate from one step
            elapsed = time.perf_counter() - (self._first_step or time.perf_counter())
            rate = (self._steps - 1) / elapsed if self._steps > 1 and elapsed > 0 else None
        else:
            rate = self._steps / max(line["wall_seconds"] - (self._wall or 0.0), 1e-9)
        speed = "–" if rate is None else f"{rate:.1f}"
        self._wall, self._first_step, self._steps = line["wall_seconds"], None, 0
        if self.bar is not None:
            self.bar.update(epoch - self.bar.n)
            self.bar.set_postfix(
                {
                    "loss": f"{line['train_loss']:.4f}",
                    "train": f"{line['train_accuracy']:.3f}",
                    "test": f"{line['test_accuracy']:.3f}",
                    "steps/s": speed,
                }
            )
        elif not self.quiet and (epoch % self.every == 0 or epoch in (1, self.epochs)):
            print(
                f"epoch {epoch}/{self.epochs}  loss {line['train_loss']:.4f}  "
                f"train {line['train_accuracy']:.3f}  test {line['test_accuracy']:.3f}  "
                f"{speed} steps/s{self._time_left(epoch)}",
                file=self.stream,
                flush=True,
            )

    def _time_left(self, epoch: int) -> str:
        """``", about 2 h 05 min left"`` from the mean time of the epochs run in this process
        (none after the last epoch)."""
        if self._began is None:  # no on_start: a fresh run, timed from this display's creation
            self._began = (self._created, 0)
        began, first = self._began
        done = epoch - first
        if epoch >= self.epochs or done <= 0:
            return ""
        left = (time.perf_counter() - began) / done * (self.epochs - epoch)
        return f", about {_duration(left)} left" if left >= 0.5 else ", under a second left"

    def on_start(self, epochs_done: int) -> None:
        """Training starts here after ``epochs_done`` epochs (a checkpoint's): the bar starts
        there, its clock now (not while the data were made), and a resumed run says so."""
        self._began = (time.perf_counter(), epochs_done)
        if self.bar is not None:
            self.bar.reset(total=self.epochs)
            self.bar.n = self.bar.initial = self.bar.last_print_n = epochs_done
            self.bar.refresh()
        if not epochs_done or self.quiet:
            return
        note = f"note: resuming from the checkpoint after epoch {epochs_done} of {self.epochs}"
        if self.bar is not None:
            self.bar.write(note, file=self.stream)
        else:
            print(note, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class SweepProgress:
    """Progress of a sweep (:class:`guessgrad.experiments.runner.Progress`)."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.stream = sys.stderr
        self.bar: tqdm | None = None
        self.tasks = 0
        self.count = 0
        self.failed: list[Outcome] = []
        self.name, self.unit, self.noun = "", "", ""
        self.total = self.done = self.next_line = 0
        self.started = time.perf_counter()

    def _write(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def phase(self, name: str, tasks: int, total: int, unit: str) -> None:
        self._close_bar()
        self.tasks, self.count = tasks, 0
        self.name, self.unit, self.total, self.done = name, unit, total, 0
        self.next_line = self._step()
        self.started = time.perf_counter()
        noun = self.noun = "run" if unit == "epoch" else "measurement"
        if self.quiet:
            return
        if _is_terminal(self.stream):
            self.bar = tqdm(total=total, desc=name, unit=unit, file=self.stream)
            self.bar.set_postfix_str(self._tally())
        else:
            extra = f", {counted(total, 'epoch')}" if unit == "epoch" else ""
            self._write(f"{name}: {counted(tasks, noun)}{extra}")

    def _step(self) -> int:
        return max(1, math.ceil(self.total / 20))

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.unit == "epoch" and self.next_line <= self.done < self.total:
            self.next_line = (self.done // self._step() + 1) * self._step()
            elapsed = time.perf_counter() - self.started
            left = elapsed * (self.total - self.done) / self.done
            self._write(
                f"{self.name}: {self.done}/{self.total} {self.unit}s "
                f"({100 * self.done / self.total:.0f}%), {_duration(elapsed)} elapsed, "
                f"about {_duration(left)} left"
            )

    def finished(self, outcome: Outcome) -> None:
        self.count += 1
        task = outcome.task
        head = f"[{self.count}/{self.tasks}] {task.label()}"
        if outcome.status == "failed":
            self.failed.append(outcome)
            self._write(f"{head} FAILED: {outcome.message}")
        elif outcome.status == "done":
            r = outcome.result
            if "train_accuracy" in r:
                self._write(
                    f"{head}: train {r['train_accuracy']:.3f}, test {r['test_accuracy']:.3f} "
                    f"({outcome.seconds:.0f} s)"
                )
            else:
                self._write(f"{head} ({outcome.seconds:.0f} s)")
        if self.bar is not None:
            self.bar.set_postfix_str(self._tally())

    def _tally(self) -> str:
        return f"{self.count}/{counted(self.tasks, self.noun)} done"

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
