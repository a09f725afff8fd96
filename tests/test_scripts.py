"""The repository's scripts still run against the current package."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from guessgrad.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """``scripts/<name>.py`` as a module, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_record_benches_and_respects_its_budget(tmp_path):
    # budget 0: the benchmark runs (tiny width, CPU), every training run is skipped
    out, store = tmp_path / "out", tmp_path / "store"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "device_record.py"),
        *("--device", "cpu", "--budget", "0", "--widths", "16", "--bench-steps", "1"),
        *("--methods", "w-transpose,w-perp:chunk=512"),
        *("--store", str(store), "--out", str(out)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    records = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in records] == ["w-transpose", "w-perp:chunk=512"]
    assert all(r["width"] == 16 and r["step_seconds_median"] > 0 for r in records)
    assert "| w-perp:chunk=512 | subspace |" in (out / "bench.md").read_text()
    assert "skip w-perp-ns-w512-d3-e300-s0" in proc.stdout
    assert not (store / "runs").exists() and not (out / "store.tar.gz").exists()


def test_device_record_estimates_runs_and_summarises_the_target(tmp_path):
    """A run is estimated from its own width's step time, else from another width's scaled by
    width² with a margin, else not at all; summary.json holds the target's ratio."""
    import torch

    from guessgrad.experiments.paper import TABLE4_EXPERIMENT
    from guessgrad.experiments.runner import RunStore, plan
    from guessgrad.files import atomic_write_json

    module = _script("device_record")
    times = {("w-perp", 128): 0.01, ("w-perp", 512): 0.05}
    assert module._step_estimate(times, "w-perp", 512) == 0.05
    assert module._step_estimate({("w-perp", 128): 0.01}, "w-perp", 512) == pytest.approx(0.24)
    assert module._step_estimate(times, "w-perp-ns", 512) is None
    assert module.run_seconds(0.1, 2400, 300) == pytest.approx(242.4 + 15 + 10)
    tasks = {
        (t.config.method, t.config.width, t.config.seed): t
        for t in plan(TABLE4_EXPERIMENT, seeds=(0,), epochs=300, device="cpu")
        if t.config.options.get("solver") != "svd"
    }
    store = RunStore(tmp_path / "store")
    for key, seconds in ((("w-perp", 512, 0), 90.0), (("w-transpose", 512, 0), 60.0)):
        config = tasks[key].config
        atomic_write_json(
            store.run_dir(config) / "final.json",
            {"config": config.to_dict(), "steps": 2400, "wall_seconds": seconds,
             "train_accuracy": 0.5, "test_accuracy": 0.4},
        )  # fmt: skip
    module.write_summary(store, tasks, torch.device("cpu"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["w512_wperp_over_wtranspose"] == 1.5 and summary["card"] is None
    assert {(r["method"], r["width"]) for r in summary["runs"]} == {
        ("w-perp", 512),
        ("w-transpose", 512),
    }


def test_solver_agreement_prints_fidelity_per_hidden_layer(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--method", "w-perp", "--width", "16", "--epochs", "1", "--quiet"]
    assert main([*argv, "--device", "cpu", "--out", str(run)]) == 0
    capsys.readouterr()
    cmd = [sys.executable, str(ROOT / "scripts" / "solver_agreement.py"), str(run)]
    proc = subprocess.run(
        [*cmd, "--fidelity-only", "--warm", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| init")]
    rows += [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| trained")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("init", "0"),
        ("init", "1"),
        ("trained", "0"),
        ("trained", "1"),
    ]
    assert all(0.5 < float(r[3]) <= 1.0 + 1e-6 for r in rows)
    # the rest in this process (each run of the script as a program loads torch anew)
    script = _script("solver_agreement")

    def printed(*args: str, run: Path = run) -> list[list[str]]:
        script.main([str(run), *args])
        return [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]

    # with k = 2 the last hidden layer (10 rows above it) is solved by block Krylov too; a
    # larger block with more Rayleigh–Ritz rounds captures more of the top-2 energy
    fidelity = {}
    for options in ((), ("--block", "3", "--ritz-iters", "3")):
        rows = printed("--fidelity-only", "--warm", "1", "--k", "2", *options)
        assert [r[1].strip() for r in rows] == ["0", "1", "2", "0", "1", "2"]
        fidelity[options] = [float(r[2]) for r in rows]
    assert sum(fidelity[("--block", "3", "--ritz-iters", "3")]) > sum(fidelity[()])
    # the gaps λ_{k+1}/λ_k: quantiles in [0, 1], in order, for the layers solved by block Krylov
    for k, expected in ((2, ["0", "1", "2"] * 2), (10, ["0", "1"] * 2), (16, [])):
        rows = printed("--gaps", "--k", str(k))
        assert [r[1].strip() for r in rows] == expected
        for r in rows:
            q = [float(v) for v in r[2:]]
            assert 0 <= q[0] <= q[1] <= q[2] <= 1  # 0: fewer than k + 1 active units
    # width 8 < k = 8 < 10 classes: the last hidden layer has 10 rows above it but only 8
    # singular values, so no λ_{k+1} (none for the others either: 8 rows)
    narrow = tmp_path / "narrow"
    argv = ["train", "--method", "w-perp", "--width", "8", "--epochs", "1", "--quiet"]
    assert main([*argv, "--device", "cpu", "--out", str(narrow)]) == 0
    assert printed("--gaps", "--k", "8", run=narrow) == []
    rows = printed("--gaps", "--k", "7", run=narrow)
    assert [r[1].strip() for r in rows] == ["0", "1", "2"] * 2
    assert all(all(v.strip() == "–" or 0 <= float(v) <= 1 for v in r[2:]) for r in rows)


def test_wtranspose_costs_prints_faults_steps_and_draws():
    cmd = [sys.executable, str(ROOT / "scripts" / "wtranspose_costs.py"), "--width", "16"]
    proc = subprocess.run(
        [*cmd, "--rounds", "2"], capture_output=True, text=True, timeout=600, check=True
    )
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "backprop",
        "w-transpose",
        "step (2 threads, median of 2 interleaved)",
        "randn",
        "rand + Box-Muller",
        "rand + ndtri",
    ]
    step = lines[2]
    bp, wt, ratio = (
        float(step.split(k)[1].split()[0]) for k in ("backprop ", "w-transpose ", "ratio ")
    )
    assert ratio == pytest.approx(wt / bp, rel=0.1)  # the times are printed to 0.01 ms


def test_wperp_step_split_times_both_solver_phases(capsys):
    """The phases are timed inside real steps (a phase the solver no longer calls through its
    module would read 0 ms) and the solver's functions are restored afterwards."""
    import guessgrad.solvers.subspace as subspace

    originals = (subspace._krylov_gram, subspace._ritz_coefficients)
    module = _script("wperp_step_split")
    module.main(["--widths", "16", "--steps", "2"])
    assert (subspace._krylov_gram, subspace._ritz_coefficients) == originals
    row = capsys.readouterr().out.splitlines()[-1].strip("|").split("|")
    step, krylov, ritz, rest = (float(cell.split()[0]) for cell in row[1:])
    assert row[0].strip() == "16" and min(step, krylov, ritz, rest) > 0
    # each phase runs inside every step, so its median is below the step's
    assert max(krylov, ritz, rest) < step


def test_small_problem_costs_times_every_call_in_both_libraries():
    cmd = [sys.executable, str(ROOT / "scripts" / "small_problem_costs.py")]
    args = ["--batch", "8", "--size", "6", "--block", "2", "--repeat", "2"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, check=True)
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines()[3:]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (call, dtype)
        for dtype in ("float64", "float32")
        for call in (
            "product 6×6 · 6×2",
            "product 6×6 · 6×6",
            "Cholesky 6×6",
            "eigh 6×6",
            "triangular solve 6×6, 2 right-hand sides",
        )
    ]
    assert all(float(r[2]) > 0 for r in rows)
    assert [r[3].strip() == "–" for r in rows] == [c.startswith(" triangular") for c, *_ in rows]
