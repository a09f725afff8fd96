"""Training runs: same-seed initialisation, reproducibility, resume, atomic files."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

import guessgrad.training as training
from guessgrad.data import MNIST1D
from guessgrad.training import (
    TrainConfig,
    error_summary,
    git_revision,
    initial_model,
    load_error_summary,
    source_digest,
    train,
)


@pytest.fixture(scope="module")
def data() -> MNIST1D:
    """A small synthetic MNIST-1D-shaped problem: 256 train, 64 test, 40 features."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 40, generator=g)
    y_train = torch.randint(0, 10, (256,), generator=g)
    y_test = torch.randint(0, 10, (64,), generator=g)
    x_train = centers[y_train] + 0.5 * torch.randn(256, 40, generator=g)
    x_test = centers[y_test] + 0.5 * torch.randn(64, 40, generator=g)
    return MNIST1D(x_train, y_train, x_test, y_test)


def _config(**kw) -> TrainConfig:
    base = dict(method="w-transpose", width=8, epochs=3, batch_size=64, lr=1e-3, seed=3)
    return TrainConfig(**{**base, **kw})


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_initial_weights_depend_on_the_seed_alone() -> None:
    a = initial_model(_config(method="backprop"))
    b = initial_model(_config(method="w-perp", options={"k": 2}))
    c = initial_model(_config(method="backprop", seed=4))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)
    assert torch.equal(a[0].bias, torch.zeros_like(a[0].bias))  # paper §4: zero biases


def test_initial_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    initial_model(_config())
    assert torch.equal(torch.rand(3), expected)


def test_train_starts_from_initial_model(data: MNIST1D, tmp_path: Path) -> None:
    # one AdamW step moves each weight by about lr, so with lr = 1e-9 the trained weights
    # equal the initial ones to within 1e-8
    config = _config(method="backprop", epochs=1, lr=1e-9, weight_decay=0.0)
    train(config, out_dir=tmp_path, data=data)
    trained = torch.load(tmp_path / "model.pt", weights_only=True)
    for name, p in initial_model(config).state_dict().items():
        assert torch.allclose(trained[name], p, atol=1e-8), name


def test_on_step_gets_each_batch_loss_and_the_epoch_loss_is_their_mean(data: MNIST1D) -> None:
    """``on_step`` receives the step index and the batch's loss as a 0-dim tensor (read
    without waiting for the device only where the caller asks); the epoch's ``train_loss`` is
    the batch-size-weighted mean of those losses, summed in float64 as Python floats are."""
    steps: list[tuple[int, torch.Tensor]] = []
    lines: list[dict] = []
    config = _config(batch_size=100, epochs=2)  # 256 examples: batches of 100, 100 and 56
    train(config, data=data, on_epoch=lines.append, on_step=lambda i, loss: steps.append((i, loss)))
    assert [i for i, _ in steps] == list(range(1, 7))
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 for _, loss in steps)
    for epoch, line in enumerate(lines):
        total = 0.0
        for (_, loss), size in zip(steps[3 * epoch : 3 * epoch + 3], (100, 100, 56), strict=True):
            total += float(loss) * size
        assert line["train_loss"] == total / 256


def test_files_and_formats(data: MNIST1D, tmp_path: Path) -> None:
    final = train(_config(), out_dir=tmp_path, data=data)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["config"] == {  # every option, written out (not only what to_dict gives)
        "method": "w-transpose",
        "width": 8,
        "depth": 3,
        "epochs": 3,
        "lr": 1e-3,
        "batch_size": 64,
        "weight_decay": 0.01,
        "seed": 3,
        "device": "cpu",
        "options": {},
    }
    assert {"version", "git_commit", "git_modified", "device", "estimator", "hardware"} <= set(cfg)
    capability = cfg["hardware"]["cpu_capability"]  # the kernels' instruction set: AVX2, …
    assert capability == torch.backends.cpu.get_cpu_capability() and capability
    lines = _metrics(tmp_path / "metrics.jsonl")
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert set(lines[0]) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "wall_seconds",
    }
    on_disk = json.loads((tmp_path / "final.json").read_text())
    assert on_disk == json.loads(json.dumps(final))
    assert final["steps"] == 3 * 4  # 256 examples in batches of 64
    assert not (tmp_path / "checkpoint.pt").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_same_config_gives_identical_results(data: MNIST1D, tmp_path: Path) -> None:
    a = train(_config(), out_dir=tmp_path / "a", data=data)
    b = train(_config(), out_dir=tmp_path / "b", data=data)
    assert (a["train_accuracy"], a["test_accuracy"]) == (b["train_accuracy"], b["test_accuracy"])
    strip = [
        {k: v for k, v in d.items() if k != "wall_seconds"}
        for d in _metrics(tmp_path / "a" / "metrics.jsonl")
    ]
    assert strip == [
        {k: v for k, v in d.items() if k != "wall_seconds"}
        for d in _metrics(tmp_path / "b" / "metrics.jsonl")
    ]


def _interrupted(config: TrainConfig, out: Path, data: MNIST1D, after: int) -> None:
    def stop(line: dict) -> None:
        if line["epoch"] == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, out_dir=out, data=data, on_epoch=stop)


def _code(monkeypatch, commit: str, modified: bool, source: str | None = None) -> None:
    """Make runs see the package at ``commit`` (``modified``: with changed files) whose
    source digest is ``source`` (default: one per commit and ``modified``)."""
    monkeypatch.setattr(training, "git_revision", lambda: (commit, modified))
    digest = source if source is not None else f"{commit[:6]}{int(modified)}"
    monkeypatch.setattr(training, "source_digest", lambda: digest)


def test_a_finished_run_is_tidied_of_what_a_killed_writer_left(
    data: MNIST1D, tmp_path: Path
) -> None:
    """Killed after writing final.json but before removing the checkpoint, or while drawing
    curves.png or writing a measurement, or after the run finished but before its sweep heard
    of it (an error.log for a finished run): the next call finds the run finished and removes
    the leftovers, except a temporary young enough to be another process's file being
    written."""
    config = _config(epochs=1)
    out = tmp_path / "run"
    final = train(config, out_dir=out, data=data)
    (out / "checkpoint.pt").write_bytes(b"superseded")
    (out / "error.log").write_text("worker died")
    (out / "diagnostics").mkdir()
    (out / "diagnostics" / "overlap-final.json.k1ll3d.tmp").write_bytes(b"half a file")
    (out / "diagnostics" / "w-transpose-final.json").write_text("{}")
    for name in ("curves.png.k1ll3d.tmp", "final.json.k1ll3d.tmp", "busy.png.x.tmp"):
        (out / name).write_bytes(b"half a file")
    fresh = out / "curves.png.wr1t1n.tmp"
    fresh.write_bytes(b"being drawn")
    old = time.time() - 2 * training.STALE_AFTER
    for path in out.glob("**/*.k1ll3d.tmp"):
        os.utime(path, (old, old))
    assert train(config, out_dir=out, data=data) == final
    left = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    assert left == sorted(
        ["busy.png.x.tmp", "config.json", "curves.png.wr1t1n.tmp", "diagnostics", "final.json",
         "metrics.jsonl", "model.pt"]
    )  # fmt: skip
    assert [p.name for p in (out / "diagnostics").iterdir()] == ["w-transpose-final.json"]


def test_interrupted_run_resumes_to_the_same_result(data: MNIST1D, tmp_path: Path) -> None:
    config = _config(method="w-perp", options={"k": 2, "solver": "subspace"}, epochs=4)
    reference = train(config, out_dir=tmp_path / "ref", data=data)

    _interrupted(config, tmp_path / "run", data, after=2)
    assert not (tmp_path / "run" / "final.json").exists()
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    # what a process killed while writing leaves beside its files, with this code and with
    # earlier versions'
    for name in ("checkpoint.pt.k1ll3d.tmp", "checkpoint.tmp", "metrics.tmp", "tmpab12cd34.tmp"):
        (tmp_path / "run" / name).write_bytes(b"half a file")
    started: list[int] = []
    resumed = train(config, out_dir=tmp_path / "run", data=data, on_start=started.append)
    assert started == [2]  # told once where it starts; not at all for a finished run
    assert train(config, out_dir=tmp_path / "run", data=data, on_start=started.append) == resumed
    assert started == [2]
    assert not list((tmp_path / "run").glob("*.tmp"))  # removed on resuming
    assert resumed["train_accuracy"] == reference["train_accuracy"]
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["steps"] == reference["steps"]
    lines = _metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    # the same trajectory, not only the same coarse accuracies: every epoch's loss and the
    # final weights, bit for bit
    ref_lines = _metrics(tmp_path / "ref" / "metrics.jsonl")
    assert [m["train_loss"] for m in lines] == [m["train_loss"] for m in ref_lines]
    weights = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    ref_weights = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    assert weights.keys() == ref_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, ref_weights[name]), name


def test_a_metrics_line_without_its_checkpoint_is_dropped_on_resuming(
    data: MNIST1D, tmp_path: Path, monkeypatch
) -> None:
    """A run killed after epoch 3's line reached metrics.jsonl but before epoch 3's checkpoint
    resumes from epoch 2's checkpoint: the line is dropped, not kept beside the epoch trained
    again (the file then reads as the uninterrupted run's)."""
    import guessgrad.training as training

    config = _config(epochs=4)
    train(config, out_dir=tmp_path / "ref", data=data)
    real = training._save_checkpoint

    def killed(path, config, model, optimizer, estimator, order, guess, epoch, *rest):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(path, config, model, optimizer, estimator, order, guess, epoch, *rest)

    monkeypatch.setattr(training, "_save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config, out_dir=tmp_path / "run", data=data)
    assert [m["epoch"] for m in _metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.setattr(training, "_save_checkpoint", real)
    train(config, out_dir=tmp_path / "run", data=data)

    def timeless(path: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if k != "wall_seconds"} for m in _metrics(path)]

    assert timeless(tmp_path / "run" / "metrics.jsonl") == timeless(
        tmp_path / "ref" / "metrics.jsonl"
    )


def test_a_resumed_run_records_each_session_and_warns_of_other_code(
    data: MNIST1D, tmp_path: Path, monkeypatch
) -> None:
    config, out = _config(epochs=4), tmp_path / "run"
    _code(monkeypatch, "a" * 40, False)
    _interrupted(config, out, data, after=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same code: no warning
        _interrupted(config, out, data, after=2)
    _code(monkeypatch, "b" * 40, True)
    with pytest.warns(UserWarning, match=r"epoch 2 .*aaaaaaa → \S+ bbbbbbb \+ modified"):
        final = train(config, out_dir=out, data=data)
    code = [(s["from_epoch"], s["git_commit"][0], s["git_modified"]) for s in final["sessions"]]
    assert code == [(0, "a", False), (1, "a", False), (2, "b", True)]
    assert final["git_commit"] == "b" * 40  # the top level: the last session
    assert all(s["hardware"] == final["hardware"] for s in final["sessions"])
    first = json.loads((out / "config.json").read_text())
    assert first["git_commit"] == "a" * 40 and first["sessions"] == final["sessions"]


def test_a_commit_that_leaves_the_package_alone_is_the_same_code(
    data: MNIST1D, tmp_path: Path, monkeypatch
) -> None:
    """A run resumed after a commit that changed only files outside the package (same source
    digest) does not warn, but its sessions keep both commits; the same commit with other
    package files (another digest) warns."""
    config, out = _config(epochs=3), tmp_path / "run"
    _code(monkeypatch, "a" * 40, False, source="s1")
    _interrupted(config, out, data, after=1)
    _code(monkeypatch, "d" * 40, False, source="s1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _interrupted(config, out, data, after=2)
    _code(monkeypatch, "d" * 40, True, source="s2")
    with pytest.warns(UserWarning, match=r"epoch 2 .*ddddddd → \S+ ddddddd \+ modified"):
        final = train(config, out_dir=out, data=data)
    code = [(s["git_commit"][0], s["source_digest"]) for s in final["sessions"]]
    assert code == [("a", "s1"), ("d", "s1"), ("d", "s2")]
    assert final["source_digest"] == "s2"


def test_source_digest_follows_the_package_files_only(tmp_path: Path) -> None:
    package = tmp_path / "guessgrad"
    (package / "solvers").mkdir(parents=True)
    (package / "training.py").write_text("x = 1\n")
    (package / "solvers" / "coefficients.json").write_text("[1]\n")
    first = source_digest(package)
    assert len(first) == 12 and first == source_digest(package)
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "training.cpython-311.pyc").write_bytes(b"\0")
    (package / "solvers" / "x.pyc").write_bytes(b"\1")
    (package / ".training.py.swp").write_bytes(b"\2")
    (tmp_path / "README.md").write_text("outside\n")
    assert source_digest(package) == first  # bytecode and files outside: no change
    (package / "solvers" / "coefficients.json").write_text("[2]\n")
    changed = source_digest(package)
    assert changed != first
    (package / "solvers" / "coefficients.json").rename(package / "coefficients.json")
    assert source_digest(package) not in (first, changed)  # a moved file is other code
    assert len(source_digest()) == 12  # the installed package itself


def test_describe_code_names_the_digest_only_without_a_commit() -> None:
    record = {"version": "0.1", "git_commit": "a" * 40, "source_digest": "3f9a0c1b2d4e"}
    assert training.describe_code(record) == "0.1 aaaaaaa"
    outside = {"version": "0.1", "git_commit": None, "source_digest": "3f9a0c1b2d4e"}
    assert training.describe_code(outside) == "0.1 no commit, source 3f9a0c1"
    assert training.describe_code({"version": "0.1"}) == "0.1 no commit"  # older records
    edited = {**record, "git_modified": True}  # the same commit, edited files: the digest says
    assert training.describe_code(edited) == "0.1 aaaaaaa + modified files, source 3f9a0c1"


def test_a_checkpoint_without_sessions_takes_the_first_from_config_json(
    data: MNIST1D, tmp_path: Path, monkeypatch
) -> None:
    config, out = _config(epochs=3), tmp_path / "run"
    _code(monkeypatch, "a" * 40, False)
    _interrupted(config, out, data, after=2)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    del ckpt["sessions"]  # as written before runs recorded their sessions
    torch.save(ckpt, out / "checkpoint.pt")
    _code(monkeypatch, "c" * 40, False)
    with pytest.warns(UserWarning, match=r"aaaaaaa → \S+ ccccccc"):
        final = train(config, out_dir=out, data=data)
    assert [(s["from_epoch"], s["git_commit"][0]) for s in final["sessions"]] == [
        (0, "a"),
        (2, "c"),
    ]


def test_finished_run_is_not_trained_again(data: MNIST1D, tmp_path: Path) -> None:
    first = train(_config(), out_dir=tmp_path, data=data)
    stamp = (tmp_path / "final.json").stat().st_mtime_ns
    calls = []
    second = train(_config(), out_dir=tmp_path, data=data, on_epoch=calls.append)
    assert calls == [] and second == json.loads(json.dumps(first))
    assert (tmp_path / "final.json").stat().st_mtime_ns == stamp


def test_a_run_of_another_config_is_neither_returned_nor_overwritten(
    data: MNIST1D, tmp_path: Path
) -> None:
    """A directory holding another configuration's finished or interrupted run raises, and
    its files are left as they were (before, a finished run was returned under the new
    config, and an interrupted one was silently started over)."""
    done, stopped = tmp_path / "done", tmp_path / "stopped"
    train(_config(), out_dir=done, data=data)
    _interrupted(_config(), stopped, data, after=1)
    files = {p: p.read_bytes() for d in (done, stopped) for p in d.iterdir()}
    with pytest.raises(training.RunDirectoryConflict, match=r"finished run .*width 8 there, 16"):
        train(_config(width=16), out_dir=done, data=data)
    with pytest.raises(training.RunDirectoryConflict, match=r"unfinished run .*lr 0.001 there"):
        train(_config(lr=1e-2), out_dir=stopped, data=data)
    # a checkpoint holds its device's random generators: it resumes on that device only
    ckpt = torch.load(stopped / "checkpoint.pt", weights_only=False)
    torch.save({**ckpt, "config": {**ckpt["config"], "device": "cuda"}}, stopped / "checkpoint.pt")
    with pytest.raises(training.RunDirectoryConflict, match=r"device 'cuda' there, 'cpu' here"):
        train(_config(), out_dir=stopped, data=data)
    (stopped / "checkpoint.pt").write_bytes(files[stopped / "checkpoint.pt"])
    assert {p: p.read_bytes() for d in (done, stopped) for p in d.iterdir()} == files
    # a finished run is the same run on any device (its directory name leaves it out)
    final = json.loads((done / "final.json").read_text())
    final["config"]["device"] = "cuda"
    (done / "final.json").write_text(json.dumps(final))
    assert train(_config(), out_dir=done, data=data) == final


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_revision_only_from_a_checkout_that_tracks_the_package(tmp_path: Path) -> None:
    """A copy of the package inside some other repository reports no commit; a tracked one
    reports its commit, and whether its files differ from it."""

    def git(*args: str) -> str:
        cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "README").write_text("x\n")
    git("add", "README")
    git("commit", "-q", "-m", "init")
    package = tmp_path / "site-packages" / "guessgrad"
    package.mkdir(parents=True)
    (package / "training.py").write_text("# installed copy\n")
    assert git_revision(package) == (None, None)  # untracked: not this package's checkout
    git("add", ".")
    git("commit", "-q", "-m", "package")
    head = git("rev-parse", "HEAD").strip()
    assert git_revision(package) == (head, False)
    (package / "training.py").write_text("# edited\n")
    assert git_revision(package) == (head, True)
    (tmp_path / "README").write_text("outside the package\n")
    (package / "training.py").write_text("# installed copy\n")
    assert git_revision(package) == (head, False)  # only the package's own files count


@pytest.mark.parametrize(
    "bad",
    [
        {"width": 0},
        {"epochs": -1},
        {"lr": 0.0},
        {"weight_decay": -0.1},
        {"depth": 1.5},
        {"lr": float("inf")},
        {"weight_decay": float("inf")},
        {"lr": float("nan")},
        {"lr": "1e-3"},
        {"lr": True},
    ],
)
def test_bad_config_values_raise(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        _config(**bad)


def test_rates_are_kept_as_given() -> None:
    """An int rate stays an int: runs stored with one keep their directory name."""
    config = _config(weight_decay=0, lr=1)
    assert config.to_dict()["weight_decay"] == 0 and type(config.lr) is int
    assert config.slug() == "w-transpose-w8-d3-e3-s3-7eca4cd1"  # the name the store has
    with pytest.raises(ValueError, match="lr must be a finite number"):
        _config(lr=10**400)


def test_a_diverging_run_warns_once_and_goes_on(data: MNIST1D, tmp_path: Path) -> None:
    with pytest.warns(
        UserWarning, match=r"training loss is (nan|-?inf) in epoch \d: training diverged"
    ):
        final = train(_config(lr=1e6, epochs=3), out_dir=tmp_path, data=data)
    assert final["steps"] == 3 * 4  # the run went on to the end
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_config(lr=1e6, epochs=3), data=data)
    assert sum("diverged" in str(w.message) for w in caught) == 1  # said once, not per epoch


def test_load_errors_say_what_the_file_is(tmp_path: Path) -> None:
    """A file torch.save did not write (text, JSON, random bytes, empty, cut short) is named as
    such, whatever the unpickler made of it; a torch file with other objects than tensors
    says so, instead of torch's advice to load it without ``weights_only``."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(3)}, good)
    files = {
        "text": b"not weights\n" * 5,
        "json": b'{"a": 1}',
        "random": bytes(range(256)) * 2,
        "empty": b"",
        "cut": good.read_bytes()[: good.stat().st_size // 2],
    }
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        for weights_only in (True, False):
            with pytest.raises(Exception) as caught:
                torch.load(path, weights_only=weights_only)
            assert load_error_summary(path, caught.value) == (
                "not a file written by torch.save, or one cut short"
            ), (name, weights_only)
    foreign = tmp_path / "foreign.pt"
    torch.save({"when": datetime.date(2020, 1, 1)}, foreign)
    with pytest.raises(Exception) as caught:
        torch.load(foreign, weights_only=True)
    assert load_error_summary(foreign, caught.value) == (
        "it holds objects other than tensors and plain data"
    )
    err = RuntimeError("storage has wrong size\nmore")
    assert load_error_summary(good, err) == "storage has wrong size"  # a zip: torch's reason


def test_error_summary_is_the_first_line_or_the_type() -> None:
    assert error_summary(ValueError("bad header\nat byte 3")) == "bad header"
    assert error_summary(EOFError()) == "EOFError"
    assert error_summary(RuntimeError("\nsecond line only")) == "RuntimeError"


def test_a_run_another_process_is_training_is_waited_for_then_read(
    data: MNIST1D, tmp_path: Path
) -> None:
    """While ``.lock`` is held (as by a second ``guessgrad train`` of the same run), train()
    waits with a warning and writes nothing; once the holder has finished the run, it returns
    that run instead of training it again."""
    import fcntl
    import threading

    config, out = _config(epochs=2), tmp_path / "run"
    out.mkdir()
    epochs_seen: list[int] = []
    result: dict = {}

    def waiting() -> None:
        result["final"] = train(
            config, out_dir=out, data=data, on_epoch=lambda line: epochs_seen.append(1)
        )

    with warnings.catch_warnings(record=True) as caught, open(out / ".lock", "w") as holder:
        warnings.simplefilter("always")
        fcntl.flock(holder, fcntl.LOCK_EX)  # the other process
        thread = threading.Thread(target=waiting)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not (out / "config.json").exists()
        # the holder trains the run to the end, then lets go
        finished = training._train(config, training.resolve_device("cpu"), out, data, None, None)
        fcntl.flock(holder, fcntl.LOCK_UN)
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert any("another process is training this run" in str(w.message) for w in caught)
    assert epochs_seen == [] and result["final"] == finished


def test_a_lock_file_removed_while_waited_for_is_taken_again(tmp_path: Path) -> None:
    """A process that waited for a run's lock, whose holder then removed the lock file with
    the folder (``guessgrad train`` stopped before its run wrote anything), does not go on
    holding a lock on a removed file: it makes the folder and the lock file again and locks
    those, so that a third process still has to wait."""
    import fcntl
    import threading

    out = tmp_path / "run"
    out.mkdir()
    inside, release = threading.Event(), threading.Event()

    def waiting() -> None:
        with training._run_lock(out):
            inside.set()
            release.wait(10)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        holder = open(out / ".lock", "w")  # noqa: SIM115 - the other process
        fcntl.flock(holder, fcntl.LOCK_EX)
        thread = threading.Thread(target=waiting)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive() and not inside.is_set()
        (out / ".lock").unlink()  # removed while held, then the lock let go
        out.rmdir()
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
        assert inside.wait(10)
        with open(out / ".lock", "w") as third:
            with pytest.raises(BlockingIOError):
                fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
        release.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_read_only_run_folder_without_a_lock_file_says_why(tmp_path: Path, monkeypatch) -> None:
    """A folder where the lock file can be neither made (no write permission) nor opened (there
    is none) is refused with the reason, not retried as if the folder had been removed."""
    out = tmp_path / "run"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lock"):
            if flags & os.O_CREAT:
                raise PermissionError(13, "Permission denied", str(path))
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(training.RunDirectoryConflict, match="No such file or directory"):
        with training._run_lock(out):
            pass


def test_a_run_whose_weights_stop_being_finite_ends_with_an_error_for_svd(
    data: MNIST1D, tmp_path: Path
) -> None:
    """The exact SVD cannot factorise non-finite W̃_b: the run stops with TrainingDiverged
    (the last finished epoch's checkpoint kept) instead of a LAPACK traceback."""
    config = _config(method="w-perp", options={"k": 2, "solver": "svd"}, lr=1e30, epochs=3)
    with pytest.raises(training.TrainingDiverged, match="no longer finite at step"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the divergence warning of the epochs before
            train(config, out_dir=tmp_path, data=data)
    assert not (tmp_path / "final.json").exists()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("checkpoint.pt", {"model": {"w": torch.ones(3)}, "epoch": 57, "optimizer": {}}),
        ("final.json", {"status": "ok", "score": 0.9}),
    ],
)
def test_another_programs_files_are_refused_and_left_alone(
    data: MNIST1D, tmp_path: Path, name: str, content: dict
) -> None:
    """A checkpoint or final record that is not a run's (no config, no fields of a run) is
    another program's: refused, not overwritten, deleted, or taken for a finished run."""
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save(content, path)
    else:
        path.write_text(json.dumps(content))
    before = path.read_bytes()
    (tmp_path / "notes.tmp").write_text("someone's draft")
    with pytest.raises(training.RunDirectoryConflict, match=f"{name} is not a readable"):
        train(_config(), out_dir=tmp_path, data=data)
    assert path.read_bytes() == before
    assert (tmp_path / "notes.tmp").read_text() == "someone's draft"


def test_a_finished_run_is_read_without_its_lock(data: MNIST1D, tmp_path: Path) -> None:
    """Reporting a finished run needs no lock (a read-only store); an unfinished one that cannot
    be locked is refused in one line."""
    final = train(_config(epochs=1), out_dir=tmp_path / "done", data=data)
    for run in ("done", "new"):
        (tmp_path / run).mkdir(exist_ok=True)
        (tmp_path / run / ".lock").unlink(missing_ok=True)
        (tmp_path / run / ".lock").symlink_to(tmp_path / "missing" / "lock")  # cannot be made
    assert train(_config(epochs=1), out_dir=tmp_path / "done", data=data) == final
    with pytest.raises(training.RunDirectoryConflict, match="cannot lock"):
        train(_config(epochs=1), out_dir=tmp_path / "new", data=data)


def test_a_newton_schulz_run_whose_activations_overflow_ends_with_an_error(
    data: MNIST1D, tmp_path: Path
) -> None:
    """A huge step can leave the weights finite (about 1e20) while the activations overflow:
    the eigensolver then fails, and that is divergence too, not a LAPACK traceback."""
    config = _config(
        method="w-perp",
        options={"k": 4, "solver": "newton-schulz"},
        width=8,
        depth=2,
        lr=1e20,
        weight_decay=0.0,
        epochs=2,
    )
    with pytest.raises(training.TrainingDiverged, match="activations are no longer finite"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(config, out_dir=tmp_path, data=data)


@pytest.mark.parametrize("seed", [-1, 2**62 + 1, 2**64, True, 1.0])
def test_seeds_outside_the_range_of_torch_generators_are_refused(seed) -> None:
    with pytest.raises(ValueError, match="seed must be"):
        _config(seed=seed)
    assert _config(seed=2**62).seed == 2**62  # the largest: seed + 2 000 003 still fits


def test_device_names_are_checked_before_anything_runs(monkeypatch) -> None:
    resolve = training.resolve_device
    assert resolve("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:abc", "cuda:", "cuda:-1", "cuda0"):
        with pytest.raises(ValueError, match="unknown device"):
            resolve(bad)
    # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"'cuda:7' requested but this machine has 1 CUDA device$"):
        resolve("cuda:7")


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")
def test_each_epoch_line_reaches_the_disk_before_its_checkpoint(
    data: MNIST1D, tmp_path: Path, monkeypatch
) -> None:
    """After a power cut, metrics.jsonl must not hold fewer epochs than the checkpoint: the
    epoch's line is fsynced before the checkpoint that counts it is written."""
    events: list[str] = []
    real_fsync, real_save = os.fsync, training._save_checkpoint

    def fsync(fd: int) -> None:
        events.append("fsync " + Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def save(path, *args, **kwargs):  # noqa: ANN001, ANN202
        events.append("checkpoint")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(training.os, "fsync", fsync)
    monkeypatch.setattr(training, "_save_checkpoint", save)
    train(_config(epochs=2), out_dir=tmp_path / "run", data=data)
    order = [e for e in events if e in ("fsync metrics.jsonl", "checkpoint")]
    assert order == ["fsync metrics.jsonl", "checkpoint"] * 2
