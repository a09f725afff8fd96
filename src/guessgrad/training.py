"""Training a model with any estimator and a ``torch.optim`` optimizer (paper §4 setup).

Every run is described by a :class:`TrainConfig`; :func:`train` writes

- ``config.json``: every option, the package version, the git commit and whether the
  package's files differed from it (:func:`git_revision`; null outside a checkout), a digest
  of the package's source files (:func:`source_digest`), the device and the hardware
  (:func:`hardware`);
- ``metrics.jsonl``: one line per epoch (``epoch``, ``train_loss``, ``train_accuracy``,
  ``test_accuracy``, ``wall_seconds``);
- ``checkpoint.pt``: model, optimizer, estimator state and RNG states after the last
  finished epoch, so an interrupted run resumes where it stopped with the same result;
- ``model.pt``: the final weights (the model's ``state_dict``), written just before
  ``final.json``, after which the checkpoint is removed;
- ``final.json``: final train/test accuracy on the full sets, ``wall_seconds``, ``steps``
  and the config, written last and atomically: its presence means the run is complete.

A run resumed from its checkpoint appends to ``sessions`` (in ``config.json``, the checkpoint
and ``final.json``) the epoch it resumed at and the code and hardware that ran from there on,
and warns when the code differs from the session before (:func:`same_code`: the source
digest, so a commit that changes only files outside the package is no change):
``final.json``'s top-level ``git_commit`` is the last session's.

Seeding: the initial weights depend on ``seed`` alone (not on the method), so every run is a
same-init twin of the backprop run with the same seed.  Batch order and guesses have their
own generators derived from ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .config import TrainConfig, check_device_name
from .data import MNIST1D, mnist1d
from .estimators import Estimator, make_estimator
from .files import LOCK_FILE, atomic_path, atomic_write_json, atomic_write_text
from .models import MLP
from .text import counted

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "TrainConfig",
    "RunDirectoryConflict",
    "TrainingDiverged",
    "train",
    "evaluate",
    "build_estimator",
    "initial_model",
    "hardware",
    "resolve_device",
    "describe_code",
    "same_code",
    "source_digest",
    "error_summary",
    "load_error_summary",
    "tidy_finished",
]


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable explicit device is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device_name(device)
    index = device[5:] if device.startswith("cuda:") else None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if index is not None and int(index) >= torch.cuda.device_count():
        count = counted(torch.cuda.device_count(), "CUDA device")
        raise ValueError(f"device {device!r} requested but this machine has {count}")
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' requested but MPS is not available")
    return torch.device(device)


def build_estimator(config: TrainConfig) -> Estimator:
    """``make_estimator(config.method, **config.options)``."""
    return make_estimator(config.method, **config.options)


def initial_model(config: TrainConfig, num_features: int = 40, num_classes: int = 10) -> nn.Module:
    """The MLP ``num_features -> width × depth -> num_classes`` with the initial weights of
    ``config``'s run, on the CPU.

    The weights depend on ``config.seed`` (and the widths) alone, so runs of different
    methods with the same seed start from the same point.  The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return MLP([num_features] + [config.width] * config.depth + [num_classes])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where a run is computed: CPU model, the vector instructions torch's CPU kernels use
    (``AVX2``, ``AVX512``, …: they set the rounding, so the same seed can end a few thousandths
    apart on two CPUs), logical cores, torch threads, device (and GPU)."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": str(device),
    }
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def git_revision(where: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, modified) of the git checkout this package's code comes from, or (None, None).

    Only a checkout that tracks this module counts: an installed copy that merely sits inside
    some other repository (a virtual environment in a project's tree) reports nothing, not
    that repository's commit.  ``modified`` says whether the package's tracked files differ
    from the commit.  ``where`` (a folder holding this module) is for tests.
    """
    here = where if where is not None else Path(__file__).resolve().parent
    name = Path(__file__).name

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return None

    tracked = git("ls-files", "--error-unmatch", "--", name)
    head = git("rev-parse", "HEAD")
    if tracked is None or tracked.returncode != 0 or head is None or head.returncode != 0:
        return None, None
    diff = git("diff", "--quiet", "HEAD", "--", ".")
    modified = None if diff is None or diff.returncode not in (0, 1) else diff.returncode == 1
    return head.stdout.strip() or None, modified


def source_digest(where: Path | None = None) -> str:
    """SHA-256 (first 12 hex digits) of the package's own files: its Python modules and JSON
    data under the package folder, each with its relative path, in sorted order (bytecode,
    editor files and the like are not code).

    It identifies the code that ran whether or not it comes from a git checkout, and two
    commits that differ only outside the package (documentation, tests) give the same digest.
    ``where`` (a package folder) is for tests.
    """
    root = where if where is not None else Path(__file__).resolve().parent
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".json")
    )
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on the whole of ``x``, ``y``."""
    total_loss, correct = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])
        total_loss += float(
            nn.functional.cross_entropy(logits, y[i : i + batch_size], reduction="sum")
        )
        correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    return total_loss / x.shape[0], correct / x.shape[0]


class TrainingDiverged(RuntimeError):
    """The weights stopped being finite and the estimator cannot go on from them (a solver
    that factorises W̃_b: the exact SVD, Newton–Schulz).  The checkpoint of the last
    finished epoch is kept."""


class RunDirectoryConflict(ValueError):
    """``out_dir`` holds a run that ``train`` must not return or resume for this config (and
    must not overwrite either: it may be hours of someone's training)."""


def _differences(stored: dict[str, Any], wanted: dict[str, Any], skip: tuple[str, ...]) -> str:
    keys = sorted(k for k in {*stored, *wanted} if k not in skip and stored.get(k) != wanted.get(k))
    return ", ".join(f"{k} {stored.get(k)!r} there, {wanted.get(k)!r} here" for k in keys)


def error_summary(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type name where the message is empty: the
    reason given in one-line errors about unreadable files."""
    return (str(err).splitlines() or [""])[0] or type(err).__name__


def load_error_summary(path: Path, err: BaseException) -> str:
    """Why ``torch.load(path)`` failed, for a one-line error.

    ``torch.save`` writes zip archives: a file that is not one was not written by it, or was
    cut short, which says more than what the unpickler makes of its bytes (``KeyError: 101``
    for a text file) or torch's advice to load a file without ``weights_only``."""
    if not zipfile.is_zipfile(path):
        return "not a file written by torch.save, or one cut short"
    text = error_summary(err)
    if text.startswith("Weights only load failed"):
        return "it holds objects other than tensors and plain data"
    return text


def _read_stored_run(
    out: Path, device: torch.device
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``out``'s ``final.json`` or else its checkpoint (loaded once: checked, then resumed);
    :class:`RunDirectoryConflict` for files that cannot be read, and for a ``config.json``
    that is not a run's (``out`` is someone else's directory: nothing is overwritten)."""
    final = ckpt = None
    reading = ""
    try:
        if (out / "final.json").exists():
            reading = "final.json"
            with open(out / reading) as f:
                final = json.load(f)
            if not _has_run_fields(final, FINAL_FIELDS):
                raise ValueError("not a finished run's record")
        elif (out / "checkpoint.pt").exists():
            reading = "checkpoint.pt"
            ckpt = torch.load(out / reading, map_location=device, weights_only=False)
            if not _has_run_fields(ckpt, CHECKPOINT_FIELDS):
                raise ValueError("not a training checkpoint")
        elif (out / "config.json").exists():
            reading = "config.json"
            with open(out / reading) as f:
                record = json.load(f)
            if not (isinstance(record, dict) and isinstance(record.get("config"), dict)):
                raise ValueError("no run configuration in it")
    except OSError as err:  # the file may be fine: no advice to remove it
        raise RunDirectoryConflict(f"cannot read {out / reading}: {err.strerror or err}") from None
    except Exception as err:
        why = error_summary(err)
        if reading == "checkpoint.pt" and ckpt is None:  # torch.load itself failed
            why = load_error_summary(out / reading, err)
        raise RunDirectoryConflict(
            f"{out / reading} is not a readable guessgrad run file ({why}); "
            "remove it, or choose another output directory"
        ) from None
    return final, ckpt


#: the files a run writes into its directory (atomically, through temporaries)
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "model.pt",
    "final.json",
    "curves.png",
)
#: the temporaries a killed writer can leave in a run's directory: ``NAME.<random>.tmp`` of
#: the files above, and those of earlier versions (``checkpoint.tmp``, ``metrics.tmp``,
#: ``tmp<8 random characters>.tmp``)
STALE_TEMPORARIES = (
    *(f"{name}.*.tmp" for name in RUN_FILES),
    "checkpoint.tmp",
    "metrics.tmp",
    "tmp" + "?" * 8 + ".tmp",
)
#: what a run's ``final.json`` and ``checkpoint.pt`` hold at least (besides a ``config`` dict);
#: a file of the same name without them is another program's, left as it is
FINAL_FIELDS = ("train_accuracy", "test_accuracy", "steps")
CHECKPOINT_FIELDS = ("model", "optimizer", "epoch", "steps")


def _has_run_fields(record: Any, fields: tuple[str, ...]) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("config"), dict)
        and all(key in record for key in fields)
    )


def config_differences(record: dict[str, Any], config: TrainConfig) -> str:
    """How the ``config`` stored in a finished run's ``record`` (its ``final.json``) differs
    from ``config``, the device aside (a finished run is the same run on any device): "" when
    it is ``config``'s, else "<field> <there> there, <here> here, …" ("config missing there"
    when the record holds none)."""
    stored = record.get("config")
    if not isinstance(stored, dict):
        return "config missing there"
    return _differences(stored, json.loads(json.dumps(config.to_dict())), ("device",))


def _check_stored_run(
    out: Path, config: TrainConfig, final: dict[str, Any] | None, ckpt: dict[str, Any] | None
) -> None:
    """Raise :class:`RunDirectoryConflict` if ``out``'s ``final.json`` (``final``) or
    checkpoint (``ckpt``) belongs to another configuration.  A finished run counts as the same
    run on any device (as its directory name says); a checkpoint resumes only on its own
    device, whose random generators it holds."""
    wanted = config.to_dict()
    if final is not None:
        diff = config_differences(final, config) if isinstance(final.get("config"), dict) else ""
        if diff:
            raise RunDirectoryConflict(
                f"{out} holds a finished run of another configuration ({diff}); "
                "remove it or choose another output directory"
            )
        return
    if ckpt is None:
        return
    stored = ckpt.get("config")
    diff = _differences(stored, wanted, ()) if isinstance(stored, dict) else ""
    if diff:
        raise RunDirectoryConflict(
            f"{out} holds an unfinished run of another configuration ({diff}); resume it with "
            f"its own settings, or remove {out / 'checkpoint.pt'} to start this one there"
        )


def train(
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    data: MNIST1D | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train an MLP on MNIST-1D with ``config``; return the content of ``final.json``.

    If ``out_dir`` holds a ``final.json`` the run is complete and its content is returned
    without training; if it holds a ``checkpoint.pt`` of the same config, training resumes
    from it.  Either of another config raises :class:`RunDirectoryConflict` (nothing is
    overwritten).  ``on_epoch`` receives each epoch's metrics line; ``on_step`` the step index
    and the batch's loss, a 0-dim tensor on the device (``float(loss)`` waits for the device,
    which the training loop itself does once per epoch); ``on_start`` the number of epochs
    already done (0, or the checkpoint's), once, when this call starts training (not where it
    returns a finished run's record).

    While it trains, ``out_dir`` is locked (``.lock``, POSIX ``flock``): a second process
    training the same run waits for the first, with a warning, and then finds it finished.
    """
    device = resolve_device(config.device)
    if out_dir is None:
        return _train(config, device, None, data, on_epoch, on_step, on_start)
    out = Path(out_dir)
    # a directory of another run or of something else is refused before anything is written
    final, ckpt = _read_stored_run(out, device)
    _check_stored_run(out, config, final, ckpt)
    if final is not None:  # finished: read without the lock (a read-only store is reported)
        tidy_finished(out)
        return final
    with _run_lock(out):
        return _train(config, device, out, data, on_epoch, on_step, on_start)


@contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory ``out`` (waits for another process's run,
    with a warning; no lock where ``fcntl`` is missing).

    A lock file that was removed while this process waited for it (``guessgrad train``
    stopped before its run wrote anything removes the folder it made, lock file included)
    locks nothing any more: the folder and the lock file are then made and locked again."""
    if fcntl is None:  # pragma: no cover - not POSIX
        out.mkdir(parents=True, exist_ok=True)
        yield
        return
    warned = False
    for _ in range(_LOCK_ATTEMPTS):
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = _open_lock(out)
        except FileNotFoundError:  # a folder on the way was removed right after it was made
            continue
        with os.fdopen(fd) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not warned:
                    warnings.warn(
                        f"{out}: another process is training this run; waiting for it to finish",
                        stacklevel=3,
                    )
                    warned = True
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError as err:
                raise RunDirectoryConflict(f"cannot lock {out}: {err.strerror or err}") from None
            if not _is_lock_file(f.fileno(), out / LOCK_FILE):
                continue  # removed while waiting: closing f releases it
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            return
    raise RunDirectoryConflict(f"cannot lock {out}: its lock file keeps being removed")


def remove_unheld_lock(out: Path) -> None:
    """Remove the lock file of the run directory ``out``, unless a process holds it
    (``OSError`` then, and the file stays).  It is removed while held here, so a process that
    waited for it finds, once it has the lock, that its file is gone, and :func:`_run_lock`
    takes the lock again on a new one."""
    if fcntl is None:  # pragma: no cover - not POSIX: there is no lock to respect
        (out / LOCK_FILE).unlink()
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR)  # for writing, as _run_lock opens it
    with os.fdopen(fd) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if another holds it
        (out / LOCK_FILE).unlink()


#: times the lock of a run directory is taken again when its lock file was removed meanwhile
_LOCK_ATTEMPTS = 100


def _open_lock(out: Path) -> int:
    """The lock file of ``out``, opened for writing (NFS emulates an exclusive flock with a
    write lock), else read-only: a lock file another user made in a shared store serves as well
    on a local disk.  ``FileNotFoundError`` where ``out`` is gone."""
    path = out / LOCK_FILE
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:  # only where out itself is gone: O_CREAT makes the file
        raise
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as err:  # a read-only folder without a lock file among them
            raise RunDirectoryConflict(f"cannot lock {out}: {err.strerror or err}") from None
    except OSError as err:
        raise RunDirectoryConflict(f"cannot lock {out}: {err.strerror or err}") from None


def _is_lock_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not removed or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino)


#: seconds after which a temporary in a finished run's directory counts as left by a killed
#: writer (a younger one may be another process's ``curves.png`` being drawn right now)
STALE_AFTER = 60.0


def tidy_finished(out: Path) -> None:
    """Remove what a process killed between writing ``final.json`` and tidying up left in a
    finished run's directory: the checkpoint (``final.json`` and ``model.pt`` supersede it),
    an ``error.log`` (of an attempt before the run finished, or of a worker killed right after
    it had), and stale temporaries, the measurements' in ``diagnostics/`` included.  Nothing is
    said where the directory cannot be written (a shared, read-only store): the run is
    finished either way."""
    old = time.time() - STALE_AFTER
    superseded = [out / "checkpoint.pt", out / "error.log"]
    leftovers = [p for pattern in STALE_TEMPORARIES for p in out.glob(pattern)]
    leftovers += list(out.glob("diagnostics/*.tmp"))
    for path in [*superseded, *leftovers]:
        try:
            if path in superseded or path.stat().st_mtime < old:
                path.unlink(missing_ok=True)
        except OSError:
            pass


#: seed offsets of a run's batch order and guesses: streams apart from the initial weights'
#: (seeded by ``config.seed`` itself), and from each other
ORDER_SEED_OFFSET = 1_000_003
GUESS_SEED_OFFSET = 2_000_003


def _train(
    config: TrainConfig,
    device: torch.device,
    out: Path | None,
    data: MNIST1D | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    on_step: Callable[[int, Tensor], None] | None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """:func:`train` once ``out`` (if any) is locked: the stored run is read again, since
    another process may have trained it meanwhile."""
    final = ckpt = None
    if out is not None:
        final, ckpt = _read_stored_run(out, device)
        _check_stored_run(out, config, final, ckpt)
        if final is not None:
            tidy_finished(out)
            return final
        for pattern in STALE_TEMPORARIES:  # of a process killed while writing (files.py)
            for stale in out.glob(pattern):
                stale.unlink(missing_ok=True)
    data = (data if data is not None else mnist1d()).to(device)
    estimator = build_estimator(config)

    model = initial_model(config, data.num_features, data.num_classes).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    order_gen = torch.Generator().manual_seed(config.seed + ORDER_SEED_OFFSET)
    guess_gen = torch.Generator(device=device).manual_seed(config.seed + GUESS_SEED_OFFSET)

    commit, modified = git_revision()
    record = {
        "config": config.to_dict(),
        "version": __version__,
        "git_commit": commit,
        "git_modified": modified,
        "source_digest": source_digest(),
        "device": str(device),
        "torch": str(torch.__version__),  # a plain str: loadable with weights_only
        "estimator": repr(estimator),
        "hardware": hardware(device),
    }
    start_epoch, steps, wall = 0, 0, 0.0
    record["sessions"] = [_session(record, 0)]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            if ckpt["config"] == config.to_dict():  # (always: _check_stored_run refuses others)
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
                estimator.state = ckpt["estimator_state"]
                # generator states are CPU byte tensors whatever the device (map_location
                # moved them with the rest)
                order_gen.set_state(ckpt["order_gen"].cpu())
                guess_gen.set_state(ckpt["guess_gen"].cpu())
                start_epoch, steps, wall = ckpt["epoch"], ckpt["steps"], ckpt["wall_seconds"]
                record["sessions"] = _resumed_sessions(ckpt, out, record, start_epoch)
        if start_epoch == 0:
            atomic_write_json(out / "config.json", record)
            (out / "metrics.jsonl").write_text("")
        else:
            _update_config_sessions(out / "config.json", record)
            _truncate_metrics(out / "metrics.jsonl", start_epoch)

    n = data.x_train.shape[0]
    diverged = False
    where = out if out is not None else config.slug()  # how messages name the run
    if on_start is not None:
        on_start(start_epoch)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=order_gen).to(device)
        loss_sum, seen = _train_epoch(
            model, estimator, optimizer, data, perm, config.batch_size, guess_gen,
            first_step=steps, epoch=epoch, where=where, on_step=on_step,
        )  # fmt: skip
        steps += math.ceil(n / config.batch_size)
        wall += time.perf_counter() - t0
        _, train_acc = evaluate(model, data.x_train, data.y_train)
        _, test_acc = evaluate(model, data.x_test, data.y_test)
        if not math.isfinite(loss_sum) and not diverged:
            diverged = True  # said once: the run goes on, as asked
            warnings.warn(
                f"{where}: the training loss is "
                f"{loss_sum / seen} "
                f"in epoch {epoch + 1}: training diverged (a smaller learning rate may help)",
                stacklevel=2,
            )
        line = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_accuracy": train_acc,
            "test_accuracy": test_acc,
            "wall_seconds": wall,
        }
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
                # on disk before the checkpoint that counts this epoch: after a power cut the
                # file never holds fewer epochs than the checkpoint (resuming keeps as many)
                f.flush()
                os.fsync(f.fileno())
            _save_checkpoint(
                out / "checkpoint.pt",
                config,
                model,
                optimizer,
                estimator,
                order_gen,
                guess_gen,
                epoch + 1,
                steps,
                wall,
                record["sessions"],
            )
        if on_epoch is not None:
            on_epoch(line)

    _, train_acc = evaluate(model, data.x_train, data.y_train)
    _, test_acc = evaluate(model, data.x_test, data.y_test)
    final = {
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "wall_seconds": wall,
        "steps": steps,
        **record,
    }
    if out is not None:
        with atomic_path(out / "model.pt") as tmp:
            torch.save(model.state_dict(), tmp)
        atomic_write_json(out / "final.json", final)
        (out / "checkpoint.pt").unlink(missing_ok=True)
    return final


def _train_epoch(
    model: nn.Module,
    estimator: Estimator,
    optimizer: torch.optim.Optimizer,
    data: MNIST1D,
    perm: Tensor,
    batch_size: int,
    guess_gen: torch.Generator,
    *,
    first_step: int,
    epoch: int,
    where: object,
    on_step: Callable[[int, Tensor], None] | None,
) -> tuple[float, int]:
    """One epoch's estimate-and-step over the batches of ``perm``; returns the sum of the
    batches' losses, each weighted by its size, and the number of examples seen.

    The batches' losses stay on the device until the epoch's end, then are read at once: a
    step on a GPU does not wait for its loss (no float64 on the device: MPS has none)."""
    losses: list[Tensor] = []
    sizes: list[int] = []
    step = first_step
    for i in range(0, perm.shape[0], batch_size):
        idx = perm[i : i + batch_size]
        try:
            loss = estimator.estimate(
                model, data.x_train[idx], data.y_train[idx], generator=guess_gen
            )
        except torch.linalg.LinAlgError as err:
            # diverged: weights no longer finite, or finite but so large that the
            # activations overflow (the solver then meets inf or NaN)
            with torch.no_grad():
                logits = model(data.x_train[idx])
            if all(bool(torch.isfinite(p).all()) for p in model.parameters()) and bool(
                torch.isfinite(logits).all()
            ):
                raise
            raise TrainingDiverged(
                f"{where}: the weights or activations are no longer finite at step "
                f"{step + 1} (epoch {epoch + 1}): training diverged, and {estimator!r} "
                f"cannot go on from them (a smaller learning rate may help)"
            ) from err
        optimizer.step()
        step += 1
        losses.append(loss)
        sizes.append(idx.shape[0])
        if on_step is not None:
            on_step(step, loss)
    # one read, which waits for the device to finish the epoch's steps
    values = torch.stack(losses).tolist()
    loss_sum = 0.0  # summed in step order, as each step's float used to be
    for value, size in zip(values, sizes, strict=True):
        loss_sum += value * size
    return loss_sum, sum(sizes)


#: the fields of a run's record that say which code and hardware ran it
_SESSION_KEYS = (
    "version",
    "git_commit",
    "git_modified",
    "source_digest",
    "torch",
    "device",
    "hardware",
)


def _session(record: dict[str, Any], from_epoch: int) -> dict[str, Any]:
    return {"from_epoch": from_epoch, **{k: record.get(k) for k in _SESSION_KEYS}}


def same_code(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' records or sessions ran the same code: the same version and source
    digest; for records written before runs had a digest, the same commit and ``modified``."""
    if a.get("source_digest") and b.get("source_digest"):
        keys: tuple[str, ...] = ("version", "source_digest")
    else:
        keys = ("version", "git_commit", "git_modified")
    return all(a.get(k) == b.get(k) for k in keys)


def _resumed_sessions(
    ckpt: dict[str, Any], out: Path, record: dict[str, Any], epoch: int
) -> list[dict[str, Any]]:
    """The checkpoint's sessions (for a checkpoint without them, the first one from
    ``config.json``) plus this one from ``epoch`` on; warns when the code changed."""
    earlier = list(ckpt.get("sessions") or [])
    if not earlier:
        try:
            with open(out / "config.json") as f:
                earlier = [_session(json.load(f), 0)]
        except (OSError, ValueError):
            earlier = []
    now = _session(record, epoch)
    if earlier and not same_code(earlier[-1], now):
        warnings.warn(
            f"{out}: resuming at epoch {epoch} with other code than the epochs before it "
            f"({describe_code(earlier[-1])} → {describe_code(now)}); final.json's "
            "'sessions' records both",
            stacklevel=3,
        )
    return [*earlier, now]


def describe_code(record: dict[str, Any]) -> str:
    """``0.1.0 1ce2447`` for a run's record or session (``+ modified files`` where the package
    differed from the commit; outside a checkout ``no commit``; in both cases with the source
    digest where the record has one: ``0.1.0 no commit, source 3f9a0c1``)."""
    commit, digest = record.get("git_commit"), record.get("source_digest")
    modified = bool(record.get("git_modified"))
    where = commit[:7] if commit else "no commit"
    text = f"{record.get('version', '?')} {where}" + (" + modified files" if modified else "")
    # the digest tells apart what the commit cannot: edited files, or no commit at all
    return text + (f", source {digest[:7]}" if digest and (modified or not commit) else "")


def _update_config_sessions(path: Path, record: dict[str, Any]) -> None:
    # config.json keeps the first session's top-level fields; only ``sessions`` grows
    try:
        with open(path) as f:
            payload = {**json.load(f), "sessions": record["sessions"]}
    except (OSError, ValueError):
        payload = record
    atomic_write_json(path, payload)


def _truncate_metrics(path: Path, epochs: int) -> None:
    # keep exactly the lines of the epochs the checkpoint covers; replace the file atomically
    # so that an interruption here cannot lose the lines already written
    lines = path.read_text().splitlines() if path.exists() else []
    atomic_write_text(path, "".join(line + "\n" for line in lines[:epochs]))


def _save_checkpoint(
    path: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    estimator: Estimator,
    order_gen: torch.Generator,
    guess_gen: torch.Generator,
    epoch: int,
    steps: int,
    wall: float,
    sessions: list[dict[str, Any]],
) -> None:
    payload = {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "estimator_state": estimator.state,
        "order_gen": order_gen.get_state(),
        "guess_gen": guess_gen.get_state(),
        "epoch": epoch,
        "steps": steps,
        "wall_seconds": wall,
        "sessions": sessions,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
