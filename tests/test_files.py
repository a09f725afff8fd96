"""Atomic result files: the old file or the whole new one, the usual permissions, no leftovers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from guessgrad.files import atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_json_never_leaves_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "final.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})  # fails half-way through serialising
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.json"]  # no temporary left


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_write_keeps_the_old_file_and_removes_its_temporary(
    tmp_path: Path, interruption: type[BaseException]
) -> None:
    path = tmp_path / "metrics.jsonl"
    atomic_write_text(path, "old\n")
    with pytest.raises(interruption), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp") and tmp != path
        raise interruption()
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_atomic_path_creates_the_folder_and_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "table.md"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.md"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_files_get_the_usual_permissions(tmp_path: Path, umask: int) -> None:
    """config.json, final.json, checkpoints, tables and the data cache are readable like any
    file the process writes."""
    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "final.json", {"a": 1})
        with atomic_path(tmp_path / "figure.png") as tmp:
            tmp.write_bytes(b"\x89PNG")
        assert os.umask(umask) == umask  # left as it was
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o666 & ~umask
    for name in ("final.json", "figure.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(os.name != "posix", reason="folders are opened for fsync on POSIX only")
def test_the_file_then_its_folder_reach_the_disk(tmp_path: Path, monkeypatch) -> None:
    """The content is flushed before the rename, and the folder's entry after it, so that a
    crash of the system leaves the old file or the whole new one."""
    synced: list[tuple[str, bool]] = []
    fsync = os.fsync

    def record(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append(("folder" if stat.S_ISDIR(mode) else "file", (tmp_path / "t.md").exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic_write_text(tmp_path / "t.md", "x")
    assert synced == [("file", False), ("folder", True)]


@pytest.mark.parametrize("after", ["open", "close"])
def test_an_interruption_as_the_temporary_is_made_leaves_nothing(
    tmp_path: Path, monkeypatch, after: str
) -> None:
    """SIGTERM becomes an exception between any two steps, also just after the temporary file
    was made and before the writer had it: the file is removed all the same."""
    from guessgrad import files

    real = getattr(os, after)

    def then_interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, after, then_interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "checkpoint.pt"):
        pytest.fail("the block began")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_taken_temporary_name_is_left_to_its_writer(tmp_path: Path, monkeypatch) -> None:
    """Two writers never share a temporary; should a name be taken all the same, the file is
    another writer's and stays."""
    from guessgrad import files

    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "0" * (2 * n))
    taken = tmp_path / f"final.json.{'0' * 16}.tmp"
    taken.write_text("another writer's")
    with pytest.raises(FileExistsError):
        atomic_write_json(tmp_path / "final.json", {"a": 1})
    assert taken.read_text() == "another writer's"
    assert not (tmp_path / "final.json").exists()
