"""Planning and running the training runs and measurements of experiments, resumably.

The run store is a directory ``ROOT/runs/<TrainConfig.slug()>/`` per run, as written by
:func:`guessgrad.training.train`, plus ``diagnostics/*.json`` measurements (see
:mod:`.measure`).  A task whose output exists is never recomputed: ``final.json`` for a
training run (written atomically, last), the measurement's JSON file (also atomic) for a
probe.  Interrupted training runs resume from their per-epoch checkpoint.

With ``jobs > 1`` tasks run in a pool of spawned processes, each limited to ``threads``
torch threads (1 by default: batched small LAPACK calls slow down by orders of magnitude
when several multi-threaded processes share few cores).  A failing task is reported, its
traceback kept in the run directory's ``error.log`` (a probe's beside its output,
``diagnostics/<name>.error.log``), and the sweep goes on.  Workers stop when the sweep's
process dies.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from ..checks import integer, optional_integer
from ..data import MNIST1D, mnist1d
from ..estimators import make_estimator
from ..files import atomic_write_json
from ..training import (
    FINAL_FIELDS,
    TrainConfig,
    _has_run_fields,
    config_differences,
    tidy_finished,
    train,
)
from .measure import diagnostics_record, overlap_record, weights_digest
from .paper import DIAG_BATCH, DIAG_SAMPLES
from .spec import Experiment, Method, Probe

__all__ = [
    "Terminated",
    "Task",
    "Outcome",
    "Progress",
    "RunStore",
    "plan",
    "unavailable_methods",
    "run_tasks",
]


class RunStore:
    """The directory ``root`` holding ``runs/<slug>/`` for every run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def run_dir(self, config: TrainConfig) -> Path:
        return self.root / "runs" / config.slug()

    def read(self, config: TrainConfig, file: str = "final.json") -> dict[str, Any] | None:
        """The JSON object in the run's file ``file``, or ``None`` if absent, unreadable or
        not an object."""
        path = self.run_dir(config) / file
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def finished(self, config: TrainConfig) -> dict[str, Any] | None:
        """The run's ``final.json`` if it is a finished run's record (as training reads it) of
        ``config`` (another configuration's, left there by ``guessgrad train --out``, say,
        is not: no table shows it as this run's)."""
        record = self.read(config)
        if not _has_run_fields(record, FINAL_FIELDS):
            return None
        assert record is not None
        return record if not config_differences(record, config) else None

    def probe_record(self, config: TrainConfig, probe: Probe) -> dict[str, Any] | None:
        """The probe's measurement of the run, or ``None`` if absent, unreadable or stale: a
        measurement at the final weights whose ``weights_sha256`` is not that of the run's
        ``model.pt`` now was taken on weights the run no longer has (it was trained again), and
        so was one of a run that is being trained again (a checkpoint and no ``final.json``).
        Records without the field (written before it existed, or by hand), and those of a run
        whose ``model.pt`` is gone or unreadable (nothing to compare with), are taken as they
        are."""
        record = self.read(config, probe.file())
        if record is not None and probe.when == "final" and self._training_again(config):
            return None  # of the weights the run had before: it has a checkpoint, no final.json
        if record is None or probe.when != "final" or "weights_sha256" not in record:
            return record
        now = weights_digest(self.run_dir(config))
        return record if now is None or record["weights_sha256"] == now else None

    def _training_again(self, config: TrainConfig) -> bool:
        run_dir = self.run_dir(config)
        try:
            return (run_dir / "checkpoint.pt").exists() and not (run_dir / "final.json").exists()
        except OSError:
            return False

    def final_state(self, config: TrainConfig) -> Literal["finished", "damaged", "absent"]:
        """Whether the run's ``final.json`` is a finished run's record, is there but cannot be
        read as one (damaged, another program's file, or another configuration's run), or is
        absent."""
        if self.finished(config) is not None:
            return "finished"
        try:
            there = (self.run_dir(config) / "final.json").exists()
        except OSError:
            there = False
        return "damaged" if there else "absent"


@dataclass(frozen=True)
class Task:
    """Train a run, or measure a probe on it."""

    kind: Literal["train", "probe"]
    config: TrainConfig
    probe: Probe | None = None
    cost: float = 1.0

    def output(self) -> str:
        """The file whose presence means the task is done, relative to the run directory."""
        return "final.json" if self.probe is None else self.probe.file()

    def label(self) -> str:
        slug = self.config.slug()
        return slug if self.probe is None else f"{slug}/{self.probe.file()}"

    def error_log(self) -> str:
        """Where the task's failure is described, relative to the run directory: ``error.log``
        for training, ``diagnostics/<name>.error.log`` beside a probe's output."""
        return (
            "error.log"
            if self.probe is None
            else f"{self.output().removesuffix('.json')}.error.log"
        )

    def done(self, store: RunStore) -> bool:
        """Whether the output is there and readable: a damaged one is not done (a damaged or
        foreign ``final.json`` makes training fail with the reason; a probe is measured again,
        as is one taken on final weights the run has since replaced)."""
        if self.probe is None:
            return store.final_state(self.config) == "finished"
        return store.probe_record(self.config, self.probe) is not None

    def log_failure(self, store: RunStore, text: str) -> Path | None:
        """Write ``text`` to the task's :meth:`error_log` and return its path; where that
        cannot be written (a read-only run folder), warn and return ``None``: a failure to
        describe a failure must not stop the sweep."""
        path = store.run_dir(self.config) / self.error_log()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{self.label()}\n\n{text}")
        except OSError as err:
            warnings.warn(
                f"cannot write {path}: {err.strerror or err}; the failure was: "
                f"{(text.strip().splitlines() or [''])[-1]}",
                stacklevel=2,
            )
            return None
        return path


@dataclass
class Outcome:
    """What became of a task: ``done``, ``skipped`` (already done, or busy) or ``failed``."""

    task: Task
    status: Literal["done", "skipped", "failed"]
    seconds: float = 0.0
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)


class Progress(Protocol):
    """Receives the sweep's progress; the CLI draws it."""

    def phase(self, name: str, tasks: int, total: int, unit: str) -> None:
        """A phase starts: ``tasks`` tasks, ``total`` units of work (epochs or tasks)."""

    def advance(self, n: int = 1) -> None:
        """``n`` more units of work are done."""

    def finished(self, outcome: Outcome) -> None:
        """A task is finished (done, skipped or failed)."""

    def close(self) -> None:
        """The sweep is over."""


def unavailable_methods(experiments: Iterable[Experiment]) -> dict[Method, str]:
    """Methods whose estimator cannot be built here (e.g. not registered), with the reason."""
    missing: dict[Method, str] = {}
    for exp in experiments:
        for m in exp.methods():
            if m in missing:
                continue
            try:
                make_estimator(m.name, **m.kwargs)
            except ValueError as err:
                missing[m] = str(err)
    return missing


def plan(
    experiment: Experiment,
    *,
    seeds: Sequence[int],
    epochs: int,
    device: str = "cpu",
    skip: Iterable[Method] = (),
) -> list[Task]:
    """Every task the experiment's cells need, each once (skipping methods in ``skip``)."""
    skip = set(skip)
    tasks: dict[str, Task] = {}
    for cell in experiment.cells:
        if cell.run in skip or (cell.probe is not None and cell.probe.estimator in skip):
            continue
        for seed in seeds:
            config = cell.run.config(width=cell.width, seed=seed, epochs=epochs, device=device)
            if cell.needs_training:
                t = Task("train", config, cost=cell.run.cost * cell.width**2 * epochs)
                tasks.setdefault(t.label(), t)
            if cell.probe is not None:
                t = Task("probe", config, cell.probe, cost=float(cell.width**3))
                tasks.setdefault(t.label(), t)
    return list(tasks.values())


# ---------------------------------------------------------------------------------------
# Executing one task (in this process or in a worker).

_DATA: MNIST1D | None = None


def _data() -> MNIST1D:
    global _DATA
    if _DATA is None:
        _DATA = mnist1d()
    return _DATA


def execute(task: Task, root: str | Path, on_epoch: Any = None) -> Outcome:
    """Run ``task`` against the store at ``root``; never raises for a failing run."""
    store = RunStore(root)
    run_dir = store.run_dir(task.config)
    if task.done(store):
        return Outcome(task, "skipped", message="already done")
    t0 = time.perf_counter()
    try:
        data = _data()
        if task.probe is None:
            # train() holds the run directory's lock: a run another process is training is
            # waited for, and then read instead of trained again
            final = train(task.config, out_dir=run_dir, data=data, on_epoch=on_epoch)
            result = {k: final[k] for k in ("train_accuracy", "test_accuracy", "wall_seconds")}
        else:
            probe = task.probe
            if probe.when == "final" and store.final_state(task.config) != "finished":
                raise RuntimeError(f"run {task.config.slug()} is not finished")
            if probe.kind == "overlap":
                record = overlap_record(task.config, run_dir, probe.when, data, batch=DIAG_BATCH)
            else:
                assert probe.estimator is not None
                record = diagnostics_record(
                    task.config,
                    run_dir,
                    probe.estimator,
                    probe.when,
                    data,
                    batch=DIAG_BATCH,
                    samples=DIAG_SAMPLES,
                )
            atomic_write_json(run_dir / probe.file(), record)
            result = {}
    except Exception as err:  # a failing run must not stop the sweep
        task.log_failure(store, traceback.format_exc())
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        return Outcome(task, "failed", time.perf_counter() - t0, message)
    (run_dir / task.error_log()).unlink(missing_ok=True)  # from an earlier failed attempt
    return Outcome(task, "done", time.perf_counter() - t0, result=result)


def plain_warnings() -> None:
    """Print warnings as ``warning: MESSAGE`` lines (the command line's, and its workers'),
    without the source file and line that Python adds for programmers."""
    warnings.formatwarning = lambda message, *_args, **_kw: f"warning: {message}\n"


def _worker(wid: int, tasks: Any, events: Any, root: str, threads: int) -> None:
    """A worker process: run tasks from ``tasks`` until ``None``, report on ``events``.

    A worker whose sweep process has died (killed with SIGKILL, or by the out-of-memory
    killer, so that it could not stop its workers) stops too: it checks between tasks and after
    every epoch (whose checkpoint is then written), and leaves the rest to the next sweep.
    The sweep stops its workers with SIGTERM, which a worker takes as ``train`` does
    (:class:`Terminated`): a file being written is not left behind half-written as a
    temporary, and the worker exits with status 143."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, _exit_once_on_signal)
    plain_warnings()
    # the sweep's process has said it, once
    warnings.filterwarnings("ignore", message="could not write the MNIST-1D cache")
    torch.set_num_threads(threads)
    parent = mp.parent_process()

    def orphaned() -> bool:
        return parent is not None and not parent.is_alive()

    def on_epoch(_line: dict[str, Any], idx: int) -> None:
        if orphaned():
            raise SystemExit(1)
        events.put(("epoch", wid, idx, None))

    while not orphaned():
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            continue
        if item is None:
            return
        idx, task = item
        events.put(("start", wid, idx, None))
        outcome = execute(task, root, on_epoch=lambda line, idx=idx: on_epoch(line, idx))
        events.put(("done", wid, idx, outcome))


# ---------------------------------------------------------------------------------------
# The sweep.


def _remaining_epochs(task: Task, store: RunStore) -> int:
    metrics = store.run_dir(task.config) / "metrics.jsonl"
    try:
        with open(metrics) as f:  # a line cut short (a power cut) counts no epoch
            done = sum(1 for line in f if line.endswith("\n"))
    except OSError:
        done = 0
    return max(task.config.epochs - done, 0)


def run_tasks(
    tasks: Sequence[Task],
    root: str | Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[Outcome]:
    """Run every task not yet done: trainings first, then measurements.

    Args:
        tasks: from :func:`plan`.
        root: the run store's directory.
        jobs: parallel worker processes (spawned); 1 runs in this process.
        threads: torch threads per worker; default 1 when ``jobs > 1``, else unchanged.
        progress: receives the phases, epochs, measurements and finished tasks.

    A ``KeyboardInterrupt`` stops the workers and propagates; finished runs stay finished
    and unfinished ones resume from their last epoch next time.
    """
    jobs = integer("jobs", jobs)
    threads = optional_integer("threads", threads)
    store = RunStore(root)
    outcomes: list[Outcome] = []
    unique = {t.label(): t for t in tasks}  # the same run may serve several experiments
    tasks = sorted(unique.values(), key=lambda t: (-t.cost, t.label()))  # slowest first
    phases = (
        ("training", "epoch", [t for t in tasks if t.kind == "train"]),
        ("measuring", "task", [t for t in tasks if t.kind == "probe"]),
    )
    todo = [[t for t in group if not t.done(store)] for _, _, group in phases]
    pending = {id(t) for t in todo[0]}
    for task in phases[0][2]:  # finished runs: what a killed writer left there goes
        if id(task) not in pending:
            tidy_finished(store.run_dir(task.config))
    if any(todo):
        _data()  # generate the data set once, before any worker needs it
    for (name, unit, every), group in zip(phases, todo):
        if unit == "task":
            # decided once the runs are trained: a run trained again (its final.json removed)
            # has new final weights, and its earlier measurements of them are stale now
            group = [t for t in every if not t.done(store)]
        if not group:
            continue
        if progress is not None:
            total = (
                sum(_remaining_epochs(t, store) for t in group) if unit == "epoch" else len(group)
            )
            progress.phase(name, len(group), total, unit)
        per_task = unit == "task"
        if jobs == 1:
            outcomes += _run_here(group, store, threads, progress, per_task)
        else:
            outcomes += _run_pool(group, store, jobs, threads or 1, progress, per_task)
    if progress is not None:
        progress.close()
    return outcomes


def _run_here(
    group: Sequence[Task],
    store: RunStore,
    threads: int | None,
    progress: Progress | None,
    per_task: bool,
) -> list[Outcome]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        outcomes = []
        for task in group:

            def on_epoch(_line: dict[str, Any]) -> None:
                if progress is not None:
                    progress.advance()

            outcome = execute(task, store.root, on_epoch=on_epoch)
            outcomes.append(outcome)
            if progress is not None:
                if per_task:
                    progress.advance()
                progress.finished(outcome)
        return outcomes
    finally:
        torch.set_num_threads(previous)


def _run_pool(
    group: Sequence[Task],
    store: RunStore,
    jobs: int,
    threads: int,
    progress: Progress | None,
    per_task: bool,
) -> list[Outcome]:
    """Run ``group`` in ``jobs`` spawned workers; a worker that dies fails only its task."""
    ctx = mp.get_context("spawn")
    tasks, events = ctx.Queue(), ctx.Queue()
    n = min(jobs, len(group))
    workers: dict[int, Any] = {}
    running: dict[int, int] = {}  # worker id -> task index
    remaining = set(range(len(group)))
    outcomes: list[Outcome] = []
    exit_codes: list[int] = []  # of workers that died between tasks (e.g. at start-up)

    def spawn(wid: int) -> None:
        proc = ctx.Process(
            target=_worker, args=(wid, tasks, events, os.fspath(store.root), threads)
        )
        start_ignoring_sigint(proc)
        workers[wid] = proc

    def finish(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if progress is not None:
            if per_task:
                progress.advance()
            progress.finished(outcome)

    def serve() -> None:
        """Queue the tasks, start the workers, and collect events until every task is done."""
        for idx, task in enumerate(group):
            tasks.put((idx, task))
        for _ in range(n):
            tasks.put(None)
        for wid in range(n):
            spawn(wid)
        next_wid = n
        while remaining:
            try:
                kind, wid, idx, outcome = events.get(timeout=0.5)
            except queue.Empty:
                kind = None
            if kind == "start":
                running[wid] = idx
            elif kind == "epoch" and progress is not None:
                progress.advance()
            elif kind == "done" and idx in remaining:
                running.pop(wid, None)
                remaining.discard(idx)
                finish(outcome)
            if kind is not None:
                continue
            # the queue is drained: look for workers that died
            for wid, proc in list(workers.items()):
                if proc.is_alive():
                    continue
                del workers[wid]
                idx = running.pop(wid, None)
                if proc.exitcode != 0 and idx is not None and idx in remaining:
                    # it died running a task (killed, out of memory): that task fails, and a
                    # new worker takes the stop signal it left in the queue
                    remaining.discard(idx)
                    why = f"worker died (exit status {proc.exitcode})"
                    group[idx].log_failure(store, f"{why}: killed, or out of memory?\n")
                    finish(Outcome(group[idx], "failed", message=why))
                    spawn(next_wid)
                    next_wid += 1
                elif proc.exitcode != 0:
                    exit_codes.append(proc.exitcode)
            if not workers:  # every worker has stopped: what is left cannot run
                why = f"workers exited with {exit_codes}" if exit_codes else "lost with a worker"
                for idx in sorted(remaining):
                    group[idx].log_failure(store, why + "\n")
                    finish(Outcome(group[idx], "failed", message=why))
                remaining.clear()

    # SIGTERM to this process alone (a job scheduler, `kill`) stops the workers too, as Ctrl-C
    # does: the handler turns it into an exception, and the except clause below terminates
    # them; the handler is put back before the workers are joined
    try:
        with temporary_handler(signal.SIGTERM, _exit_on_signal):
            # from the first task queued: an interruption must cancel the queue's feeder thread
            try:
                serve()
            except BaseException:
                for proc in workers.values():
                    proc.terminate()
                # the tasks no worker took stay in the queue's pipe; past its buffer (64 KiB, a few
                # hundred tasks) the queue's feeder thread would block this process's exit for good
                tasks.cancel_join_thread()
                raise
    finally:
        for proc in workers.values():
            proc.join(timeout=30)
            if proc.is_alive():  # SIGTERM was not enough (a worker ignores a second one)
                proc.kill()
    return outcomes


def start_ignoring_sigint(proc: Any) -> None:
    """``proc.start()`` with SIGINT ignored from the new process's first instruction on.

    Ctrl-C on a terminal goes to the whole process group: a worker still importing torch
    (a second or two after its start), before it can ignore SIGINT itself, would die of it
    with a traceback, although the sweep stops its workers itself.  An ignored signal stays
    ignored across ``exec`` and Python's start-up, so the worker is born ignoring it.  Only
    in the main thread (the only one that may set handlers); a Ctrl-C to this process during
    the start itself (milliseconds) is lost."""
    with temporary_handler(signal.SIGINT, signal.SIG_IGN):
        proc.start()


@contextmanager
def temporary_handler(signum: int, handler: Any) -> Iterator[None]:
    """``handler`` for signal ``signum`` inside the block, the previous one after it.

    Only the main thread may set handlers: elsewhere the block runs with the handlers as they
    are.  A previous handler not set from Python (``signal.signal`` returns None for it) cannot
    be put back; the default one is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


class Terminated(SystemExit):
    """SIGTERM (``kill``, a job scheduler's time limit) as an exception, exit status 143: a
    sweep or a run stops as on Ctrl-C (workers stopped, temporaries removed, locks released),
    and a script that does not catch it exits quietly with that status."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise Terminated


def _exit_once_on_signal(signum: int, _frame: Any) -> None:
    # a worker may get SIGTERM twice (from a scheduler, to the whole process group, and from
    # its sweep): the second must not interrupt the cleanup the first started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated
