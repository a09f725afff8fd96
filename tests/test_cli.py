"""The ``guessgrad`` command line, on tiny settings (width 8–64, 1–2 epochs)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import guessgrad.experiments.runner as runner
import guessgrad.training as training
from guessgrad.cli import build_parser, main
from guessgrad.cli.common import UsageError
from guessgrad.cli.reproduce import EXPERIMENT_NAMES, select


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory: pytest.TempPathFactory):
    """MNIST-1D is generated (offline) into a cache shared by this test session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUESSGRAD_CACHE", str(tmp_path_factory.getbasetemp() / "guessgrad-cache"))
        yield


def _train(out: Path, *extra: str) -> int:
    args = ["train", "--method", "w-transpose", "--width", "8", "--epochs", "2"]
    return main([*args, "--device", "cpu", "--out", str(out), *extra])


def test_train_writes_the_run_files(tmp_path: Path, capsys) -> None:
    assert _train(tmp_path / "run") == 0
    out, err = capsys.readouterr()
    assert "train accuracy" in out and str(tmp_path / "run") in out
    assert "epoch 1/2" in err and "epoch 2/2" in err  # plain lines: not a terminal
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["method"] == "w-transpose" and config["config"]["width"] == 8
    assert config["config"]["lr"] == 1e-4 and config["config"]["batch_size"] == 512
    assert config["device"] == "cpu" and "git_commit" in config and "version" in config
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert {"train_accuracy", "test_accuracy", "wall_seconds", "steps", "config"} <= set(final)
    assert final["steps"] == 2 * 8  # 4000 examples in batches of 512
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_twice_gives_identical_accuracies(tmp_path: Path) -> None:
    assert _train(tmp_path / "a", "--quiet", "--seed", "5") == 0
    assert _train(tmp_path / "b", "--quiet", "--seed", "5") == 0
    a, b = (json.loads((tmp_path / d / "final.json").read_text()) for d in "ab")
    assert (a["train_accuracy"], a["test_accuracy"]) == (b["train_accuracy"], b["test_accuracy"])


def test_train_quiet_prints_nothing_and_finished_runs_are_kept(tmp_path: Path, capsys) -> None:
    assert _train(tmp_path / "run", "--quiet") == 0
    assert capsys.readouterr() == ("", "")
    stamp = (tmp_path / "run" / "final.json").stat().st_mtime_ns
    assert _train(tmp_path / "run") == 0
    assert "not trained again" in capsys.readouterr().out
    assert (tmp_path / "run" / "final.json").stat().st_mtime_ns == stamp
    # the same directory for another configuration: an error, and the run is kept
    assert _train(tmp_path / "run", "--quiet", "--seed", "9") == 2
    out, err = capsys.readouterr()
    assert out == "" and "finished run of another configuration (seed 0 there, 9 here)" in err
    assert (tmp_path / "run" / "final.json").stat().st_mtime_ns == stamp


def test_train_names_its_run_as_the_experiments_do(tmp_path: Path, monkeypatch) -> None:
    """Without --k/--solver/--sigma, train gives the options the experiments give (W̃⊥: k = 10
    and the fast solver), so the default --out is the run directory a sweep reuses; an option
    typed on the command line replaces its default."""
    from guessgrad.config import TrainConfig
    from guessgrad.experiments.paper import TABLE3_EXPERIMENT

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--method", "w-perp", "--width", "8", "--epochs", "1", "--quiet"]) == 0
    (task,) = [
        t
        for t in runner.plan(TABLE3_EXPERIMENT, seeds=[0], epochs=1, device="cpu")
        if t.config.method == "w-perp" and t.config.width == 64
    ]
    wanted = TrainConfig(**{**task.config.to_dict(), "width": 8}).slug()
    assert sorted(p.name for p in (tmp_path / "results" / "runs").iterdir()) == [wanted]
    assert wanted.startswith("w-perp-k10-solversubspace-w8")
    argv = ["train", "--method", "w-perp", "--k", "3", "--width", "8", "--epochs", "1", "--quiet"]
    assert main(argv) == 0
    assert (tmp_path / "results" / "runs" / "w-perp-k3-solversubspace-w8-d3-e1-s0").is_dir()


def test_train_still_finds_a_run_stored_with_only_the_options_typed(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Earlier versions stored a run with the options typed on the command line only (none for
    ``train --method w-perp``): the same command reports it, in --out or in the run store,
    instead of refusing it as another configuration or training it again."""
    from guessgrad.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    old = TrainConfig(method="w-perp", width=8, epochs=1, options={}, device="cpu")
    for out in (tmp_path / "mine", Path("results") / "runs" / old.slug()):
        training.train(old, out_dir=out)
        argv = ["train", "--method", "w-perp", "--width", "8", "--epochs", "1"]
        assert main([*argv, *(["--out", str(out)] if out.name == "mine" else [])]) == 0
        assert "not trained again" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "results" / "runs").iterdir()) == [old.slug()]


def test_train_still_finds_a_run_stored_with_an_option_that_changes_nothing(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A run stored with a typed ``--option`` at its default value (before such options were
    left out of the name) is reported by the same command, in --out or in the run store."""
    from guessgrad.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    options = {"k": 10, "solver": "subspace", "ritz_iters": 2}
    old = TrainConfig(method="w-perp", width=8, epochs=1, options=options, device="cpu")
    for out in (tmp_path / "mine", Path("results") / "runs" / old.slug()):
        training.train(old, out_dir=out)
        argv = ["train", "--width", "8", "--epochs", "1", "--option", "ritz_iters=02"]
        assert main([*argv, *(["--out", str(out)] if out.name == "mine" else [])]) == 0
        out_text, err = capsys.readouterr()
        assert "not trained again" in out_text
        assert "note: --option ritz_iters=02 changes nothing here" in err  # as typed
    assert sorted(p.name for p in (tmp_path / "results" / "runs").iterdir()) == [old.slug()]


def test_train_reads_a_finished_run_in_a_read_only_folder(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """A finished run in a folder this process may not write to (a shared store) is reported,
    not refused, and nothing is written there; an unfinished run there is refused."""
    run, new = tmp_path / "run", tmp_path / "new"
    assert _train(run, "--quiet") == 0
    new.mkdir()
    (run / "curves.png").unlink()
    before = sorted(p.name for p in run.iterdir())
    access = os.access

    def read_only(path, mode, **kwargs) -> bool:
        if Path(path) in (run, new) and mode & os.W_OK:
            return False
        return access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", read_only)
    assert _train(run) == 0
    out, err = capsys.readouterr()
    assert "not trained again" in out and "train accuracy" in out and err == ""
    assert sorted(p.name for p in run.iterdir()) == before
    assert _train(new) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "--method", "no-such-method"], "unknown estimator 'no-such-method'"),
        (["train", "--method", "w-perp", "--k", "0"], "--k: expected a positive integer or 'rank'"),
        (["train", "--method", "w-transpose", "--k", "3"], "'w-transpose' has no option 'k'"),
        (["train", "--method", "w-perp", "--solver", "magic"], "unknown solver 'magic'"),
        (["train", "--method", "w-perp-ns", "--k", "rank"], "(the method 'w-perp'), not the"),
        (["train", "--width", "-4"], "--width: expected a positive integer, got '-4'"),
        (["train", "--lr", "nan"], "--lr: expected a finite positive number, got 'nan'"),
        (["train", "--lr", "inf"], "--lr: expected a finite positive number, got 'inf'"),
        (["train", "--weight-decay", "inf"], "--weight-decay: expected a finite number >= 0"),
        (["train", "--seed", "-1"], "--seed: expected an integer in [0, 2**62], got '-1'"),
        (["train", "--seed", str(2**64 - 1)], "--seed: expected an integer in [0, 2**62]"),
        # an unset shell variable: not the working directory
        (["train", "--out", ""], "--out: expected a directory, got an empty path"),
        (["train", "--out", "/tmp/" + "a" * 300], "File name too long"),
        (["train", "--sigma", "1e-3"], "'w-perp' has no option 'sigma'"),  # w-perp has no σ
        (
            ["train", "--method", "w-perp-ns", "--solver", "svd"],
            "'w-perp-ns' has no option 'solver'",
        ),
        (["reproduce", "table3", "--widths", ","], "--widths: expected widths like 64,128"),
        (["reproduce", "table3", "--seeds", "0"], "(seed 0 alone: 1, or 0,)"),
        (["bench", "--methods", ","], "--methods: expected names like backprop,w-perp"),
        (["bench", "--methods", "w-perp,backprop,w-perp"], "--methods lists w-perp twice"),
        (
            ["bench", "--methods", "w-perp:k=2:depth=3,w-perp:depth=3:k=02"],
            "lists w-perp twice: w-perp:k=2:depth=3 and w-perp:depth=3:k=02",
        ),
        (
            ["bench", "--methods", "w-perp,w-perp:k=10"],
            "lists w-perp twice: w-perp and w-perp:k=10",
        ),
        (["bench", "--width", "abc"], "--width: expected a positive integer, got 'abc'"),
        (["diagnose", "--seed", "-2"], "--seed: expected an integer in [0, 2**62], got '-2'"),
        (["train", "--device", "tpu"], "argument --device: unknown device 'tpu'"),
        (["reproduce", "table3", "--report-only", "--device", "foo"], "unknown device 'foo'"),
        (["bench", "--device", "cuda:"], "unknown device 'cuda:'"),
        (["reproduce", "table9"], "unknown experiment 'table9'"),
        (["reproduce", "table3", "--seeds", "0,0"], "expected distinct seeds, integers in"),
        (["reproduce", "table3", "--seeds=0,-1"], "integers in [0, 2**62], got '0,-1'"),
        (["report", "table3", "--seeds", f"0,{2**62 + 1}"], "integers in [0, 2**62], got '0,"),
        (["reproduce", "table3", "--widths", "7"], "no width 7 in table3; its widths: 64, 128"),
        # one width of two unknown: refused, not a quietly narrower table
        (["report", "table3", "--widths", "64,999"], "no width 999 in table3; its widths"),
        (["report", "table3", "--quick", "--widths", "64,256"], "no width 256 in table3 --quick"),
        (["reproduce", "table3", "--jobs", "0"], "--jobs: expected a positive integer, got '0'"),
        (["reproduce", "table4", "--methods", "no-such-method"], "no method 'no-such-method'"),
        (["reproduce", "table4", "--methods", ","], "--methods: expected names like"),
        (
            ["report", "all", "--methods", "w-perp-ns", "--widths", "64"],
            "no experiment has cells at widths 64 of w-perp-ns",
        ),
        (["report", "fig3"], "unknown experiment 'fig3'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv: list[str], says: str, capsys) -> None:
    """Each bad input is refused with status 2 and one line naming what is wrong."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "error" in err and says in err, err


def test_reproduce_says_which_run_failed_and_exits_1(tmp_path: Path, capsys, monkeypatch) -> None:
    """A run that fails does not stop the sweep, which ends with status 1 and a line naming
    the run, the error and its log; once the run succeeds, the log of the failure goes."""
    argv = ["reproduce", "table3", "--widths", "64", "--methods", "w-transpose,backprop"]
    argv += ["--epochs", "1", "--seeds", "1", "--jobs", "1", "--out", str(tmp_path)]
    real = runner.train

    def broken(config, **kwargs):
        if config.method == "w-transpose":
            raise RuntimeError("boom")
        return real(config, **kwargs)

    monkeypatch.setattr(runner, "train", broken)
    assert main(argv) == 1
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "w-transpose-w64-d3-e1-s0"
    assert f"RuntimeError: boom (details in {run / 'error.log'})" in err
    assert "boom" in (run / "error.log").read_text()
    assert (tmp_path / "runs" / "backprop-w64-d3-e1-s0" / "final.json").exists()  # went on
    monkeypatch.setattr(runner, "train", real)
    assert main(argv) == 0
    assert (run / "final.json").exists() and not (run / "error.log").exists()


def test_reproduce_then_report_from_the_store(tmp_path: Path, capsys, monkeypatch) -> None:
    argv = ["table3", "--widths", "64", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]
    assert main(["reproduce", *argv, "--jobs", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| 64 |" in out and "(0.268, " in out  # our value beside the paper's
    folder = tmp_path / "table3_w64_seeds0_e1"  # the options that narrow the table, named
    assert f"(written to {folder}/)" in out
    table = folder / "table.md"
    assert table.exists() and (folder / "fig2.png").exists()
    summary = json.loads((folder / "summary.json").read_text())
    assert all(c["n"] == 1 for c in summary["cells"] if c["width"] == 64)
    assert len(list((tmp_path / "runs").iterdir())) == 5

    # rendering again trains nothing and gives the same table
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("must not train"))
    before = table.read_text()
    table.unlink()
    assert main(["report", *argv]) == 0
    assert table.read_text() == before
    assert main(["reproduce", *argv, "--report-only"]) == 0
    assert main(["reproduce", *argv, "--jobs", "1"]) == 0  # everything is done already

    # the full table goes elsewhere and leaves the narrowed one alone
    assert main(["report", "table3", "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "table3" / "table.md").read_text() != before
    assert table.read_text() == before


@pytest.mark.parametrize(
    ("argv", "folders"),
    [
        (["table3"], ["table3"]),
        (["table3", "--seeds", "3", "--epochs", "300"], ["table3"]),  # the defaults: no tag
        (["table3", "--quick"], ["table3_quick"]),
        (["table3", "--quick", "--seeds", "1"], ["table3_quick"]),
        (["table4", "--widths", "512", "--methods", "w-perp-ns"], ["table4_w512_w-perp-ns"]),
        (["table1", "--seeds", "3,0", "--epochs", "20"], ["table1_seeds0-3_e20"]),
        # the same table, however it is asked for: tags only for what the options change
        (["table3", "--seeds", "2,1,0"], ["table3"]),
        (["table3", "--widths", "512,64"], ["table3_w64-512"]),
        (["table3", "--widths", "64,512"], ["table3_w64-512"]),
        (["table3", "--quick", "--widths", "128,64"], ["table3_quick"]),
        (["table4", "--methods", "w-transpose,w-perp-ns"], ["table4_w-perp-ns+w-transpose"]),
        (
            ["all", "--quick", "--widths", "128"],
            ["table1_quick", "table2_quick", "table3_quick_w128"]
            + ["table4_quick", "fig1_quick", "fig2_quick_w128"],
        ),
    ],
)
def test_each_selection_has_its_own_folder(argv, folders) -> None:
    args = build_parser().parse_args(["report", *argv])
    assert [s.folder for s in select(args)] == folders


def test_a_method_no_experiment_has_is_an_error() -> None:
    """A typo in --methods is not silently dropped (it would name a folder, too)."""
    args = build_parser().parse_args(["report", "table3", "--methods", "w-perp,w-prep"])
    with pytest.raises(UsageError, match=r"no method 'w-prep' in table3; its methods: .*w-perp"):
        select(args)
    args = build_parser().parse_args(["report", "all", "--methods", "../x"])
    with pytest.raises(UsageError, match=r"no method '../x' in any experiment"):
        select(args)


@pytest.mark.parametrize("command", [["train", "--width", "8"], ["reproduce", "table3"]])
def test_an_unusable_out_is_one_line_and_status_2(tmp_path: Path, capsys, command) -> None:
    """--out naming a file, or below one, or a link to nowhere (or below one): an error before
    any work, not a traceback."""
    afile = tmp_path / "afile"
    afile.write_text("")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    missing = f"{link} is a link to {tmp_path / 'nowhere'}, which is missing"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # a link that cannot be followed is not called missing
    for out, message in [
        (afile, "is a file"),
        (afile / "sub", "cannot create"),
        (link, missing),
        (link / "sub", missing),
        (loop, "is not writable"),
    ]:
        assert main([*command, "--epochs", "1", "--out", str(out)]) == 2
        stdout, err = capsys.readouterr()
        assert stdout == "" and len(err.strip().splitlines()) == 1
        assert message in err and str(out) in err and "Traceback" not in err
    assert afile.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link", "loop"]


def test_folders_are_made_again_where_a_parent_was_removed_but_not_where_mkdir_refuses(
    tmp_path: Path, monkeypatch
) -> None:
    """A parent removed meanwhile (another process's interrupted train) is made again; a
    folder that mkdir cannot make below an existing parent (/proc refuses with ENOENT) is
    the error it is, not "a folder on the way keeps being removed" after many attempts."""
    from guessgrad.cli import common

    real_mkdir, calls = os.mkdir, []

    def removed_once(path, *args):
        calls.append(Path(path))
        if Path(path).name == "b" and len(calls) == 2:
            os.rmdir(Path(path).parent)  # "a", made by this call, removed by someone else
        return real_mkdir(path, *args)

    monkeypatch.setattr(common.os, "mkdir", removed_once)
    made = common._make_folders(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir() and len(made) == 3
    assert [p.name for p in calls] == ["a", "b", "a", "b", "c"]

    def refused(path, *args):
        calls.append(Path(path))
        raise FileNotFoundError(2, "No such file or directory", str(path))

    calls.clear()
    monkeypatch.setattr(common.os, "mkdir", refused)
    with pytest.raises(FileNotFoundError):
        common._make_folders(tmp_path / "d")
    assert calls == [tmp_path / "d"]


@pytest.mark.parametrize("command", [["report"], ["reproduce", "--report-only"]])
def test_report_of_a_read_only_store_is_an_error(
    tmp_path: Path, capsys, monkeypatch, command
) -> None:
    """A run store this process may not write to is refused in one line, before anything is
    rendered (it used to fail with a traceback at the first figure's temporary file)."""
    out = tmp_path / "store"
    (out / "runs").mkdir(parents=True)
    access = os.access

    def read_only(path, mode, **kwargs) -> bool:
        if Path(path) == out and mode & os.W_OK:
            return False
        return access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", read_only)
    assert main([command[0], "table3", *command[1:], "--out", str(out)]) == 2
    stdout, err = capsys.readouterr()
    assert stdout == "" and len(err.strip().splitlines()) == 1
    assert "is not writable" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["runs"]


def test_report_all_names_the_experiments_a_selection_leaves_out(tmp_path: Path, capsys) -> None:
    """``all`` with --widths renders the experiments that have cells there and says which
    it leaves out (a single experiment without such cells is an error, above)."""
    (tmp_path / "runs").mkdir()
    argv = ["report", "all", "--widths", "64", "--seeds", "1", "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    stdout, err = capsys.readouterr()
    assert err == "note: table1, table2, table4, table5, fig1 left out: no cells at widths 64\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fig2_w64_seeds0_e1",
        "runs",
        "table3_w64_seeds0_e1",
    ]
    assert main([*argv, "--quiet", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("command", [["report"], ["reproduce", "--report-only"]])
def test_report_without_a_run_store_is_an_error(tmp_path: Path, capsys, command) -> None:
    """A mistyped --out renders nothing and creates nothing (it used to write a table of
    empty cells into a new directory)."""
    out = tmp_path / "resluts"
    assert main([command[0], "table3", *command[1:], "--out", str(out)]) == 2
    stdout, err = capsys.readouterr()
    assert stdout == "" and len(err.strip().splitlines()) == 1
    assert "no run store" in err and str(out) in err
    assert not out.exists()


_NO_TORCH = """
import sys
from guessgrad.cli import main
try:
    main(ARGV)
except SystemExit:
    pass
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["train", "--help"],
        ["reproduce", "--help"],
        ["diagnose", "--help"],
        ["bench", "--help"],
        ["train", "--width", "-1"],
        ["train", "--option", "block"],
        ["reproduce", "table3", "--seeds", "0"],
    ],
)
def test_help_and_bad_options_do_not_load_torch(argv: list[str]) -> None:
    """The parsers are built without PyTorch: help and option errors come at once."""
    code = _NO_TORCH.replace("ARGV", repr(argv))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"
    assert bool(done.stderr) == (argv[-1] not in ("--help", "--version")), done.stderr


@pytest.mark.parametrize("module", ["guessgrad", "guessgrad.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("guessgrad ")


def test_the_package_loads_its_public_names_on_first_use() -> None:
    """``import guessgrad`` does not load PyTorch; every name in ``__all__`` is there when asked
    for, and only those."""
    code = (
        "import sys, guessgrad\n"
        "print('torch' in sys.modules)\n"
        "print(all(getattr(guessgrad, n) is not None for n in guessgrad.__all__))\n"
        "print(set(guessgrad.__all__) <= set(dir(guessgrad)))\n"
        "print(guessgrad.WPerp.__module__, guessgrad.data.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:4] == [
        "False",
        "True",
        "True",
        "guessgrad.estimators.forward_gradient guessgrad.data",
    ]
    import guessgrad

    with pytest.raises(AttributeError, match="no attribute 'WPerpp'"):
        guessgrad.WPerpp  # noqa: B018


def test_the_parsers_names_are_the_registries() -> None:
    """The names the parsers list without importing the registries are theirs."""
    from guessgrad.config import METHODS
    from guessgrad.estimators import ESTIMATORS
    from guessgrad.experiments import EXPERIMENTS

    assert ESTIMATORS[: len(METHODS)] == list(METHODS)
    assert EXPERIMENT_NAMES == tuple(EXPERIMENTS)


def test_diagnose_prints_one_row_per_hidden_layer(tmp_path: Path, capsys) -> None:
    argv = ["diagnose", "--method", "w-transpose", "--width", "8", "--batch", "32"]
    assert main([*argv, "--samples", "2", "--device", "cpu"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3  # header and three hidden layers
    assert [r.split("|")[1].strip() for r in rows] == ["hidden layer", "1", "2", "3"]
    assert _train(tmp_path / "run", "--quiet") == 0
    assert main([*argv, "--samples", "2", "--checkpoint", str(tmp_path / "run"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["estimator"] == "WTranspose()" and len(record["layers"]) == 3
    assert [r["layer"] for r in record["layers"]] == [0, 1, 2]  # the library's index


def test_diagnose_notes_a_k_at_or_above_the_width_as_train_does(capsys) -> None:
    argv = ["diagnose", "--method", "w-perp", "--width", "8", "--batch", "16", "--samples", "1"]
    assert main([*argv, "--k", "8"]) == 0
    out, err = capsys.readouterr()
    assert "note: k = 8 >= width 8: each guess spans the whole row space" in err
    assert "1 guess each" in out.splitlines()[0]
    assert main([*argv, "--k", "7"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_diagnose_prints_the_librarys_statistics(capsys) -> None:
    """``guessgrad diagnose`` prints, row by row and column by column, what
    ``guessgrad.diagnose`` gives for the same initial weights (seed), batch, number of
    guesses and k, with the guesses drawn from that seed."""
    import torch

    import guessgrad
    from guessgrad.config import TrainConfig
    from guessgrad.training import initial_model

    argv = ["diagnose", "--method", "w-transpose", "--width", "8", "--batch", "32"]
    argv += ["--samples", "3", "--overlap-k", "2", "--seed", "5", "--device", "cpu"]
    data = guessgrad.data.mnist1d()
    model = initial_model(TrainConfig(method="w-transpose", width=8, seed=5), 40, 10)
    records = guessgrad.diagnose(
        model,
        data.x_train[:32],
        data.y_train[:32],
        guessgrad.make_estimator("w-transpose"),
        samples=3,
        k=2,
        generator=torch.Generator().manual_seed(5),
    )
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["layers"]
    assert printed == [json.loads(json.dumps(r.as_dict())) for r in records]
    assert main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    for row, r in zip(rows[1:], records, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells == [
            str(r.layer + 1),
            f"{r.bias:.3e}",
            f"{r.variance:.3e}",
            f"{r.variance_exact:.3e}",
            f"{r.cov_norm:.4f}",
            f"{r.overlap:.3f} (k=2)",
            f"{r.cosine:.4f}",
        ]


def test_diagnose_takes_the_shape_from_the_weights(tmp_path: Path, capsys) -> None:
    """Width and depth come from the stored weights (a finished run's model.pt, an unfinished
    one's checkpoint.pt); a --width that contradicts them, or a file that holds no weights,
    is a one-line error."""
    args = ["train", "--method", "w-transpose", "--width", "8", "--depth", "2", "--epochs", "3"]

    def stop(line: dict) -> None:
        if line["epoch"] == 1:
            raise KeyboardInterrupt

    runner_train = training.train
    with pytest.MonkeyPatch.context() as mp:  # interrupted after one epoch: a checkpoint only
        mp.setattr(
            "guessgrad.training.train", lambda *a, **k: runner_train(*a, **{**k, "on_epoch": stop})
        )
        assert main([*args, "--quiet", "--device", "cpu", "--out", str(tmp_path / "run")]) == 130
    assert not (tmp_path / "run" / "model.pt").exists()
    capsys.readouterr()
    argv = ["diagnose", "--method", "w-transpose", "--batch", "16", "--samples", "2"]
    assert main([*argv, "--checkpoint", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "width 8," in out and len([r for r in out.splitlines() if r.startswith("| ")]) == 3
    (tmp_path / "notes.txt").write_text("not weights\n")
    for extra, message in [
        (["--checkpoint", str(tmp_path / "run"), "--width", "16"], "holds width 8, depth 2"),
        (
            ["--checkpoint", str(tmp_path / "notes.txt")],
            "notes.txt is not a guessgrad model.pt or checkpoint.pt (not a file written by torch",
        ),
        (["--checkpoint", str(tmp_path / "run" / "config.json")], "is not a guessgrad"),
        (["--checkpoint", str(tmp_path)], "no weights in"),
    ]:
        assert main([*argv, *extra]) == 2
        stdout, err = capsys.readouterr()
        assert stdout == "" and len(err.strip().splitlines()) == 1 and message in err


def test_a_mistyped_option_is_named_with_the_closest_one() -> None:
    """Options are never abbreviated (``--seed`` is not ``--seeds``: that would start a sweep
    of another size), and the error comes from the subcommand with a suggestion."""
    for argv, expected in [
        (["report", "table3", "--seed", "3"], "--seed 3 (did you mean --seeds?)"),
        (["train", "--widht", "8"], "(did you mean --width?) (see guessgrad train --help)"),
        (["reproduce", "table3", "--out=x", "surplus"], "arguments: surplus (see guessgrad rep"),
        (["--bogus", "train"], "guessgrad: error: unrecognized arguments: --bogus (see guessg"),
        (["train", "--", "foo"], "arguments: -- foo (see guessgrad train --help)"),
        # a misspelt option alone is named as such, not taken for a missing command
        (["--vers"], "unrecognized arguments: --vers (did you mean --version?)"),
        ([], "guessgrad: error: the following arguments are required: COMMAND (see guessgrad"),
    ]:
        with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(io.StringIO()) as err:
            build_parser().parse_args(argv)
        assert exit_.value.code == 2 and expected in err.getvalue()


def test_train_into_a_directory_with_unreadable_run_files(tmp_path: Path, capsys) -> None:
    """A corrupt checkpoint or final.json, or another program's config.json, is a one-line
    error and stays as it was."""
    for name, content in [
        ("checkpoint.pt", "x"),
        ("final.json", "{"),
        ("config.json", '{"learning_rate": 3}'),
    ]:
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text(content)
        assert _train(out, "--quiet") == 2
        stdout, err = capsys.readouterr()
        assert stdout == "" and len(err.strip().splitlines()) == 1
        assert f"{out / name} is not a readable guessgrad run file" in err
        if name == "checkpoint.pt":
            assert "(not a file written by torch.save, or one cut short)" in err
        assert (out / name).read_text() == content and len(list(out.iterdir())) == 1
    # a checkpoint that cannot be read at all (here: a directory) is not called corrupt
    (tmp_path / "odd" / "checkpoint.pt").mkdir(parents=True)
    assert _train(tmp_path / "odd", "--quiet") == 2
    err = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'odd' / 'checkpoint.pt'}" in err and "remove" not in err


def test_an_interrupt_before_the_run_writes_leaves_no_empty_folder(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Ctrl-C while the data is generated (the first seconds) removes the folders that train
    created and that are still empty; a folder that was there before, or that the run began
    to fill, stays."""

    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("guessgrad.data.mnist1d", interrupted)
    assert _train(tmp_path / "new" / "run", "--quiet") == 130
    assert list(tmp_path.iterdir()) == []  # "new" too: it was made for the run
    (tmp_path / "there").mkdir()
    assert _train(tmp_path / "there", "--quiet") == 130
    assert (tmp_path / "there").is_dir()
    monkeypatch.undo()

    def writes_then_interrupted(config, *, out_dir, **_kw):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("guessgrad.training.train", writes_then_interrupted)
    assert _train(tmp_path / "begun" / "run", "--quiet") == 130
    assert [p.name for p in (tmp_path / "begun" / "run").iterdir()] == ["config.json"]
    # only what this call made: through "new/..", the folder "there" made earlier stays
    monkeypatch.setattr("guessgrad.data.mnist1d", interrupted)
    assert _train(tmp_path / "new" / ".." / "there", "--quiet") == 130
    assert (tmp_path / "there").is_dir() and not (tmp_path / "new").exists()
    monkeypatch.undo()
    # interrupted once the run holds its lock, before it wrote anything: the lock file alone
    # goes with the folder, unless another process holds it
    fcntl = pytest.importorskip("fcntl")

    from guessgrad.training import _run_lock

    def locks_then_interrupted(config, *, out_dir, **_kw):
        with _run_lock(out_dir):
            raise KeyboardInterrupt

    monkeypatch.setattr("guessgrad.training.train", locks_then_interrupted)
    assert _train(tmp_path / "locked" / "run", "--quiet") == 130
    assert not (tmp_path / "locked").exists()

    def held_elsewhere(config, *, out_dir, **_kw):
        out_dir.mkdir(parents=True, exist_ok=True)
        held.append(open(out_dir / ".lock", "w"))  # noqa: SIM115 - held past this call
        fcntl.flock(held[0], fcntl.LOCK_EX)
        raise KeyboardInterrupt

    held: list = []
    monkeypatch.setattr("guessgrad.training.train", held_elsewhere)
    assert _train(tmp_path / "held" / "run", "--quiet") == 130
    held[0].close()
    assert [p.name for p in (tmp_path / "held" / "run").iterdir()] == [".lock"]
    capsys.readouterr()


def test_an_out_that_cannot_be_made_leaves_none_of_its_folders(tmp_path: Path, capsys) -> None:
    """--out new/<a name too long>: "new" is made, the next level fails; the one-line error
    leaves no "new" behind."""
    assert _train(tmp_path / "new" / ("x" * 300), "--quiet") == 2
    assert "File name too long" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_counts_read_in_the_singular_for_one() -> None:
    from guessgrad.text import counted

    assert [counted(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]


def test_warnings_are_plain_lines_while_a_command_runs(tmp_path: Path, monkeypatch) -> None:
    from guessgrad.experiments.runner import plain_warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    before = warnings.formatwarning
    seen = []

    def stand_in(*_args, **_kw):
        seen.append(warnings.formatwarning("x: diverged", UserWarning, "f", 1))
        raise KeyboardInterrupt

    monkeypatch.setattr("guessgrad.training.train", stand_in)
    assert _train(tmp_path / "run", "--quiet") == 130
    assert seen == ["warning: x: diverged\n"]
    assert warnings.formatwarning is before  # the caller's formatting is back
    plain_warnings()
    assert warnings.formatwarning("m", UserWarning, "f.py", 3) == "warning: m\n"


def test_train_notes_settings_that_do_not_mean_what_they_seem(tmp_path: Path, capsys) -> None:
    args = ["train", "--method", "w-perp", "--width", "8", "--epochs", "1", "--device", "cpu"]
    assert main([*args, "--batch-size", "5000", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "note: k = 10 >= width 8: each guess spans the whole row space" in err
    assert "note: batch size 5000 > 4000 training examples" in err
    assert main([*args[:2], "w-transpose", *args[3:], "--out", str(tmp_path / "b")]) == 0
    assert "note:" not in capsys.readouterr().err
    # the k note's boundary: k = width spans the row space, k = width − 1 need not
    assert main([*args, "--k", "8", "--out", str(tmp_path / "c")]) == 0
    assert "note: k = 8 >= width 8" in capsys.readouterr().err
    assert main([*args, "--k", "7", "--out", str(tmp_path / "d")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_train_defaults_are_the_papers_and_every_option_reaches_the_run(
    tmp_path: Path,
) -> None:
    """Paper §4: width 128, depth 3, 300 epochs, Adam(W) at lr 1e-4, batch 512, weight decay
    0.01, seed 0; each option given on the command line is the run's, in config.json."""
    from guessgrad.cli import build_parser

    args = build_parser().parse_args(["train"])
    assert (args.width, args.depth, args.epochs, args.seed) == (128, 3, 300, 0)
    assert (args.lr, args.batch_size, args.weight_decay) == (1e-4, 512, 0.01)
    assert args.method == "w-perp"
    out = tmp_path / "run"
    argv = ["train", "--method", "w-transpose", "--width", "6", "--depth", "2", "--epochs", "1"]
    argv += ["--lr", "3e-4", "--batch-size", "700", "--weight-decay", "0.05", "--seed", "4"]
    assert main([*argv, "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config == {
        "method": "w-transpose",
        "width": 6,
        "depth": 2,
        "epochs": 1,
        "lr": 3e-4,
        "batch_size": 700,
        "weight_decay": 0.05,
        "seed": 4,
        "device": "cpu",
        "options": {},
    }
    assert json.loads((out / "final.json").read_text())["steps"] == 6  # 4000 / 700, rounded up


def test_train_passes_other_estimator_options_with_option(tmp_path: Path, capsys) -> None:
    """``--option KEY=VALUE`` reaches the estimator, typed as bench's ``name:key=value``, and is
    part of the run's options and name, except where it changes nothing (a default value, or an
    option the chosen solver does not use): that one is left out, with a note."""
    out = tmp_path / "run"
    argv = ["train", "--method", "w-perp", "--k", "1", "--width", "8", "--epochs", "1"]
    argv += ["--option", "block=4", "--option", "ritz_iters=8", "--option", "chunk=None"]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: --option chunk=None changes nothing here" in err and "block=4 changes" not in err
    record = json.loads((out / "config.json").read_text())
    options = record["config"]["options"]
    assert options == {"k": 1, "solver": "subspace", "block": 4, "ritz_iters": 8}
    assert "block=4" in record["estimator"] and "ritz_iters=8" in record["estimator"]
    assert json.loads((out / "final.json").read_text())["config"]["options"] == options
    from guessgrad.config import TrainConfig

    slug = TrainConfig(method="w-perp", width=8, epochs=1, options=options).slug()
    assert "-block4-" in slug and "-ritz_iters8-" in slug
    # an option that the others need is kept (without depth=4, block=2 cannot hold k = 9), and
    # so is a value other than the default (warm_start=False)
    out = tmp_path / "needed"
    argv = ["train", "--k", "9", "--width", "16", "--epochs", "1", "--option", "block=2"]
    argv += ["--option", "depth=4", "--option", "warm_start=False"]
    assert main([*argv, "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    options = json.loads((out / "config.json").read_text())["config"]["options"]
    assert options == {"k": 9, "solver": "subspace", "block": 2, "depth": 4, "warm_start": False}
    # the default value (block = k included), or an option the exact SVD does not use, names
    # the plain run
    for extra in (
        ["--option", "ritz_iters=2"],
        ["--option", "block=10"],
        ["--solver", "svd", "--option", "depth=3"],
    ):
        out = tmp_path / extra[-1]
        argv = ["train", "--method", "w-perp", "--width", "8", "--epochs", "1", *extra]
        assert main([*argv, "--device", "cpu", "--quiet", "--out", str(out)]) == 0
        assert capsys.readouterr().err == ""  # --quiet: no note
        options = json.loads((out / "config.json").read_text())["config"]["options"]
        assert options == {"k": 10, "solver": extra[1] if extra[0] == "--solver" else "subspace"}


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--option", "block"], "argument --option: expected KEY=VALUE, got 'block'"),
        (["--option", "=4"], "argument --option: expected KEY=VALUE, got '=4'"),
        (["--option", "k=3"], "--option k=...: give k as --k"),
        (["--option", "block=2", "--option", "block=3"], "--option block is given twice"),
        (["--option", "blok=3"], "estimator 'w-perp' has no option 'blok' (its options: k,"),
        (["--option", "ritz_iters=0"], "ritz_iters must be a positive integer"),
    ],
)
def test_bad_estimator_option_is_a_usage_error(tmp_path: Path, capsys, extra, says) -> None:
    out = tmp_path / "run"
    argv = ["train", "--width", "8", "--epochs", "1", "--device", "cpu", "--out", str(out)]
    try:
        status = main([*argv, *extra])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("module", "command", "says"),
    [
        ("reproduce", ["reproduce", "table3"], "interrupted: finished runs are kept"),
        ("bench", ["bench"], "interrupted."),
        ("diagnose", ["diagnose"], "interrupted."),
    ],
)
def test_ctrl_c_says_what_is_kept(module, command, says, monkeypatch, capsys) -> None:
    """reproduce keeps its finished runs; bench and diagnose keep nothing (train: below)."""

    def interrupted(_args):
        raise KeyboardInterrupt

    name = "run_reproduce" if module == "reproduce" else "run"
    monkeypatch.setattr(f"guessgrad.cli.{module}.{name}", interrupted)
    assert main(command) == 130
    err = capsys.readouterr().err.strip()
    if says == "interrupted.":
        assert err == says
    else:
        assert err == f"{says}; run the same command again to resume."


@pytest.mark.parametrize("written", ["nothing", "config.json", "checkpoint.pt", "final.json"])
def test_ctrl_c_in_train_says_what_its_folder_holds(written, tmp_path, monkeypatch, capsys):
    """Stopped before its first epoch, train keeps nothing (and removes the folder it made,
    unless the run had written its first files: then nothing to resume); after one, the
    checkpoint; after the run's end (drawing its curves, say), the results.  Each used to be
    announced as a checkpoint to resume."""
    out = tmp_path / "run"

    def stopped(config, *, out_dir, **_kwargs):
        if written != "nothing":
            (out_dir / written).write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("guessgrad.training.train", stopped)
    argv = ["train", "--width", "8", "--epochs", "1", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 130
    says = {
        "nothing": "no epoch had finished: nothing is kept",
        "config.json": "no epoch had finished: nothing to resume (the same command starts again)",
        "checkpoint.pt": "the checkpoint of the last finished epoch is kept; run the same "
        "command again to resume",
        "final.json": f"the run had finished; its results are in {out}",
    }[written]
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"interrupted: {says}."
    assert out.exists() == (written != "nothing")


def test_train_that_waited_for_another_process_says_it_did_not_train(tmp_path, monkeypatch, capsys):
    """A second ``train`` of one run waits for the first's lock and then finds it finished
    (``train`` returns without starting): it says so, as for a run finished beforehand."""
    out = tmp_path / "run"
    record = {"train_accuracy": 0.5, "test_accuracy": 0.25, "steps": 8, "wall_seconds": 1.0}

    def finished_meanwhile(config, *, out_dir, on_start=None, **_kwargs):
        (out_dir / "metrics.jsonl").write_text("")
        return {**record, "device": "cpu"}

    def trained(config, *, out_dir, on_start=None, **_kwargs):
        on_start(0)
        return finished_meanwhile(config, out_dir=out_dir)

    argv = ["train", "--width", "8", "--epochs", "1", "--device", "cpu", "--out", str(out)]
    for fake, says in ((finished_meanwhile, True), (trained, False)):
        monkeypatch.setattr("guessgrad.training.train", fake)
        assert main(argv) == 0
        stdout = capsys.readouterr().out
        assert ("was finished by another process: not trained again" in stdout) == says
        assert "train accuracy 0.5000, test accuracy 0.2500" in stdout


def test_ctrl_c_while_starting_up_is_no_traceback(monkeypatch, capsys) -> None:
    """Ctrl-C before the command has begun (while torch is imported, a second or two) stops
    with the same status and a plain message, not a traceback from inside an import."""
    import guessgrad.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["train"]) == 130
    assert capsys.readouterr().err == "\ninterrupted.\n"


def test_output_cut_short_by_the_reader_is_no_traceback() -> None:
    """``guessgrad report ... | head -1``: the reader closes the pipe; the command stops
    quietly with SIGPIPE's status instead of a BrokenPipeError traceback."""
    code = (
        "import sys, guessgrad.cli.bench as b\n"
        "def run(args):\n"
        "    for _ in range(100000): print('x' * 100)\n"
        "b.run = run\n"
        "from guessgrad.cli import main\n"
        "sys.exit(main(['bench']))\n"
    )
    done = subprocess.run(
        f'{sys.executable} -c "{code}" | head -c 10; exit ${{PIPESTATUS[0]}}',
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert done.stdout == "x" * 10 and done.stderr == "" and done.returncode == 141


def test_a_broken_pipe_with_no_real_stdout_is_no_traceback(monkeypatch) -> None:
    """Called in-process with stdout replaced by an object without a file descriptor."""

    def broken(_args):
        raise BrokenPipeError

    monkeypatch.setattr("guessgrad.cli.bench.run", broken)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert main(["bench"]) == 141


def _terminate_after_two_epochs(argv: list[str], runs: Path) -> str:
    """Start ``guessgrad ARGV``, send SIGTERM once every run under ``runs`` that has begun has
    two epochs recorded, and return its stderr (status 143 checked)."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "guessgrad", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            files = list(runs.glob("**/metrics.jsonl"))
            if files and all(f.read_text().count("\n") >= 2 for f in files):
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    return err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_train_like_ctrl_c(tmp_path: Path) -> None:
    """``kill`` or a job scheduler's time limit (SIGTERM) stops ``train`` as Ctrl-C does:
    a message, status 143, the checkpoint kept for the same command to resume, no temporary
    left."""
    out = tmp_path / "run"
    argv = ["train", "--method", "w-transpose", "--width", "8", "--epochs", "100000"]
    err = _terminate_after_two_epochs([*argv, "--threads", "1", "--out", str(out)], out)
    kept = "the checkpoint of the last finished epoch is kept"
    assert f"terminated: {kept}; run the same command again to resume." in err
    assert "Traceback" not in err
    assert (out / "checkpoint.pt").exists() and not list(out.glob("*.tmp"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_a_sweep_with_workers_like_ctrl_c(tmp_path: Path) -> None:
    """The same for a sweep whose runs train in worker processes (its pool's own handler)."""
    argv = ["reproduce", "table3", "--widths", "64", "--methods", "w-transpose"]
    argv += ["--seeds", "0,1", "--epochs", "100000", "--jobs", "2", "--threads", "1"]
    err = _terminate_after_two_epochs([*argv, "--out", str(tmp_path)], tmp_path / "runs")
    assert "terminated: finished runs are kept; run the same command again to resume." in err
    assert "Traceback" not in err
