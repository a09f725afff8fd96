"""Writing result files so that an interruption never leaves a part of one.

Every file a run or a report writes (config, checkpoint, final record, measurements, tables,
figures; not the metrics log, which gets a line appended per epoch and is cut back through
:func:`atomic_write_text` when a run resumes) and the data cache go through
:func:`atomic_path`: the content is written to a temporary file beside the destination,
flushed to disk and renamed onto it (the folder is flushed too, so the rename survives a crash
of the system), so a reader sees the old file or the whole new one.  A write that fails or is
interrupted by an exception (Ctrl-C included, and SIGTERM, which ``train`` and a sweep's
workers turn into one) removes its temporary file; only a process killed by a signal it cannot
handle (SIGKILL) can leave one, named ``<name>.<random>.tmp``, which a resumed run removes
from its folder.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "atomic_path", "atomic_write_json", "atomic_write_text"]

#: the file in a run's folder that a training process holds locked while it trains
LOCK_FILE = ".lock"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; move it onto ``path`` when
    the block ends normally, remove it when the block raises.

    The folder is created if missing.  The file gets the permissions of any file the process
    creates (0o666 less the umask).  The temporary's name, ``<name>.<16 hex digits>.tmp``, ends
    in ``.tmp``, so a writer that picks its format by the file's suffix (matplotlib's
    ``savefig``, ``numpy.savez``) must be told the format or given an open file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name is chosen before the file exists and the file is made inside the ``try``, so an
    # interruption at any moment (SIGTERM is raised between any two steps) finds it to remove;
    # 64 random bits make it no other writer's name
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # less the umask
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if not (isinstance(err, FileExistsError) and err.filename == str(tmp)):
            tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def atomic_write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON with sorted keys, written through :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` written through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _sync_folder(folder: Path) -> None:
    # the rename itself reaches the disk only with the folder's entry: fsync the folder where
    # the system allows it (POSIX; not Windows, whose folders cannot be opened this way)
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
