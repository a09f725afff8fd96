"""The experiments layer: the paper's data, resumable sweeps, reports from stored runs."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

import guessgrad.experiments.runner as runner
from guessgrad.estimators import ESTIMATORS
from guessgrad.experiments import (
    EXPERIMENTS,
    Cell,
    Experiment,
    Probe,
    RunStore,
    method,
    plan,
    report,
    run_tasks,
    unavailable_methods,
)
from guessgrad.experiments.measure import overlap_curve, weights_digest
from guessgrad.experiments.paper import TABLE1, TABLE2, TABLE3, TABLE4, TABLE5, W_PERP, W_PERP_NS
from guessgrad.experiments.spec import OverlapFigure
from guessgrad.files import atomic_write_json
from guessgrad.metrics import overlap

# the module (the package exports its function of the same name)
report_module = importlib.import_module("guessgrad.experiments.report")


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory: pytest.TempPathFactory):
    """MNIST-1D is generated (offline) into a cache shared by this test session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUESSGRAD_CACHE", str(tmp_path_factory.getbasetemp() / "guessgrad-cache"))
        yield


def _tiny(epochs: int = 2) -> Experiment:
    """Two methods × two seeds at width 8: four runs of a few steps each."""
    bp, wt = method("backprop", "backprop"), method("W̃ᵀ", "w-transpose")
    cells = tuple(
        Cell(row="8", col=m.label, run=m, width=8, quantity="train_accuracy", paper=0.5)
        for m in (bp, wt)
    )
    return Experiment(name="tiny", title="tiny", cells=cells, seeds=2, epochs=epochs)


class _Recorder:
    """A Progress that records events and can interrupt the sweep."""

    def __init__(self, stop_after_epochs: int | None = None) -> None:
        self.epochs = 0
        self.outcomes = []
        self.stop_after_epochs = stop_after_epochs

    def phase(self, name, tasks, total, unit):
        self.total = total

    def advance(self, n=1):
        self.epochs += n
        if self.stop_after_epochs is not None and self.epochs >= self.stop_after_epochs:
            raise KeyboardInterrupt

    def finished(self, outcome):
        self.outcomes.append(outcome)

    def close(self):
        pass


# ---------------------------------------------------------------------------------------
# The paper's numbers and the experiments as data


#: the paper's tables as printed (Table 1 is prose in the paper: "W̃ᵀ 0.312; W̃⊥ k=rank 0.311,
#: k=25 0.323, k=10 0.324, k=1 0.275"), a transcription kept apart from the package's own
_PRINTED = """
| method | variance | bias | cov. norm |
| W̃ᵀ | 1.50e−4 | 2.75e−4 | 0.084 |
| W̃⊥-bottom | 1.30e−5 | 2.83e−4 | 0.085 |
| W̃⊥ (k=10) | 1.03e−5 | 2.86e−5 | 0.085 |

| width | weight pert. | act. pert. | W̃ᵀ | W̃⊥ (k=10) | backprop |
| 64 | 0.121 | 0.201 | 0.268 | 0.268 | 0.536 |
| 128 | 0.124 | 0.275 | 0.312 | 0.323 | 0.709 |
| 256 | 0.179 | 0.309 | 0.376 | 0.434 | 0.887 |
| 512 | 0.177 | 0.319 | 0.494 | 0.581 | 1.000 |

| method | width | time | train | test |
| W̃⊥-NS | 512 | 6 h | 0.594 | 0.477 |
| W̃⊥ k=10 | 512 | 40 h | 0.581 | 0.498 |
| W̃ᵀ | 512 | 26 min | 0.486 | 0.438 |
| W̃⊥-NS | 128 | 9 min | 0.326 | 0.291 |
| W̃⊥ k=10 | 128 | 1 h | 0.324 | 0.283 |
| W̃ᵀ | 128 | 5 min | 0.312 | 0.277 |

| method | variance | bias | train | test |
| W̃⊥ k=10 | 6.33e−6 | 3.63e−5 | 0.433 | 0.383 |
| W̃P | 1.75e−4 | 1.35e−8 | 0.367 | 0.314 |
| W̃ᵀ | 7.04e−5 | 1.68e−4 | 0.375 | 0.316 |
"""


def _printed_tables() -> list[list[list[str]]]:
    blocks = [b for b in _PRINTED.strip().split("\n\n")]
    return [
        [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
        for block in blocks
    ]


def _number(text: str) -> float:
    units = {"h": 3600, "min": 60}
    value, *unit = text.replace("−", "-").split()
    return float(value) * (units[unit[0]] if unit else 1)


def test_published_numbers_are_the_papers_every_cell() -> None:
    """Every published number the reports print beside ours, cell by cell against the
    tables as printed: a transposed row, swapped columns or a mistyped digit fails."""
    t2, t3, t4, t5 = _printed_tables()
    label = {"W̃⊥ k=10": "W̃⊥ (k=10)"}
    assert TABLE1 == {
        "W̃ᵀ": 0.312,
        "W̃⊥ (k=rank)": 0.311,
        "W̃⊥ (k=25)": 0.323,
        "W̃⊥ (k=10)": 0.324,
        "W̃⊥ (k=1)": 0.275,
    }
    assert TABLE2 == {
        row[0]: dict(zip(("variance_exact", "bias", "cov_norm"), map(_number, row[1:])))
        for row in t2[1:]
    }
    assert TABLE3 == {int(row[0]): dict(zip(t3[0][1:], map(_number, row[1:]))) for row in t3[1:]}
    assert TABLE4 == {
        (label.get(row[0], row[0]), int(row[1])): dict(
            zip(("wall_seconds", "train_accuracy", "test_accuracy"), map(_number, row[2:]))
        )
        for row in t4[1:]
    }
    keys = ("variance_exact", "bias", "train_accuracy", "test_accuracy")
    assert TABLE5 == {
        label.get(row[0], row[0]): dict(zip(keys, map(_number, row[1:]))) for row in t5[1:]
    }
    # and each experiment's cells carry them where they belong: Table 3's W̃ᵀ at width 256
    table3 = EXPERIMENTS["table3"]
    cell = next(c for c in table3.cells if c.col == "W̃ᵀ" and c.width == 256 and c.section == "")
    assert cell.paper == 0.376


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiments_are_well_formed(name: str) -> None:
    exp = EXPERIMENTS[name]
    keys = [(c.section, c.row, c.col) for c in exp.cells]
    assert len(keys) == len(set(keys)), "two cells share a place"
    for cell in exp.cells:
        if cell.probe is not None:
            assert 0 <= cell.probe.layer < 3
    quick = exp.with_preset(exp.quick)
    assert quick.cells and quick.seeds == 1
    assert plan(quick, seeds=[0], epochs=quick.epochs)


def test_table3_quick_is_the_main_command() -> None:
    quick = EXPERIMENTS["table3"].with_preset(EXPERIMENTS["table3"].quick)
    train = [t for t in plan(quick, seeds=[0], epochs=quick.epochs) if t.kind == "train"]
    assert {t.config.width for t in train} == {64, 128} and quick.epochs == 300
    assert {t.config.method for t in train} == {
        "weight-perturbation",
        "activation-perturbation",
        "w-transpose",
        "w-perp",
        "backprop",
    }


def test_table3_and_fig2_share_their_runs() -> None:
    slugs = {
        name: {t.config.slug() for t in plan(EXPERIMENTS[name], seeds=[0, 1], epochs=300)}
        for name in ("table3", "fig2")
    }
    assert slugs["fig2"] == slugs["table3"]


def test_methods_filter_keeps_the_rows_of_those_methods() -> None:
    """``only_methods`` keeps cells by run-directory key or registry name; fig1's overlap
    figure follows its run."""
    table4 = EXPERIMENTS["table4"]
    ns = table4.only_methods(("w-perp-ns",)).restrict((512,))
    slugs = {t.config.slug() for t in plan(ns, seeds=[0, 1], epochs=300)}
    assert slugs == {"w-perp-ns-w512-d3-e300-s0", "w-perp-ns-w512-d3-e300-s1"}
    both = table4.only_methods(("w-perp",))
    assert {c.run.key() for c in both.cells} == {
        "w-perp-k10-solversvd",
        "w-perp-k10-solversubspace",
    }
    assert not table4.only_methods(("backprop",)).cells
    assert not EXPERIMENTS["fig1"].only_methods(("w-transpose",)).figures


def test_missing_estimators_are_marked_not_fatal(tmp_path: Path, monkeypatch) -> None:
    """A method whose estimator cannot be built here (not registered, say) is left out of the
    plan, its cells read "n/a" beside the paper's number, and a note says why."""
    missing = unavailable_methods([EXPERIMENTS["table4"]])
    assert (W_PERP_NS in missing) == ("w-perp-ns" not in ESTIMATORS)
    assert W_PERP not in missing
    real = runner.make_estimator

    def without_ns(name, **kwargs):
        if name == "w-perp-ns":
            raise ValueError("unknown estimator 'w-perp-ns'")
        return real(name, **kwargs)

    monkeypatch.setattr(runner, "make_estimator", without_ns)
    exp = EXPERIMENTS["table4"].restrict((128,))
    missing = unavailable_methods([exp])
    assert list(missing) == [W_PERP_NS]
    planned = {t.config.method for t in plan(exp, seeds=[0], epochs=300, skip=missing)}
    assert "w-perp-ns" not in planned and "w-perp" in planned
    markdown = report(exp, tmp_path, tmp_path, seeds=[0], epochs=300, unavailable=missing)
    row = next(line for line in markdown.splitlines() if line.startswith("| W̃⊥-NS"))
    assert "n/a (" in row and "—" not in row
    assert "(w-perp-ns) is not available here: unknown estimator 'w-perp-ns'." in markdown


def test_a_cell_averages_the_seeds_asked_for(tmp_path: Path) -> None:
    """Seeds are run seeds, not positions: ``--seeds 3,7`` reads the runs of seeds 3 and 7,
    in that order, whatever else the store holds."""
    exp = EXPERIMENTS["table3"].restrict((64,))
    wt = next(c for c in exp.cells if c.col == "W̃ᵀ" and c.section == "")
    for seed, acc in ((0, 0.90), (1, 0.80), (3, 0.30), (7, 0.34)):
        _store_final(tmp_path, wt, seed, 300, train_accuracy=acc)
    markdown = report(exp, tmp_path, tmp_path, seeds=[3, 7], epochs=300)
    assert "0.320 ± 0.028 (0.268, +0.052)" in markdown
    summary = json.loads((tmp_path / "table3" / "summary.json").read_text())
    cell = next(c for c in summary["cells"] if c["col"] == "W̃ᵀ" and c["section"] == "")
    assert cell["values"] == [0.30, 0.34]


# ---------------------------------------------------------------------------------------
# Measurements


def test_overlap_curve_equals_the_metric_for_every_k() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 9, generator=g, dtype=torch.float64)
    w[:, :, :3] = 0  # masked columns, as W̃ = W M has: rank ≤ 5
    grad = (w.mT @ torch.randn(6, 5, 1, generator=g, dtype=torch.float64)).squeeze(-1)
    grad[0] = 0  # an example without gradient is left out of the mean
    sums, alive, rank = overlap_curve(w, grad)
    curve = sums / alive
    assert int(alive) == 5 and rank.tolist() == [5] * 6
    for k in range(1, 6):
        assert curve[k - 1].item() == pytest.approx(overlap(w, grad, k), abs=1e-12)
    assert curve[-1].item() == pytest.approx(1.0)  # g lies in the row space of W̃


# ---------------------------------------------------------------------------------------
# Sweeps


def test_interrupted_sweep_recomputes_nothing_finished(tmp_path: Path, monkeypatch) -> None:
    exp = _tiny(epochs=2)
    tasks = plan(exp, seeds=[0, 1], epochs=2)
    assert len(tasks) == 4
    # interrupted in the middle of the second run (after 3 epochs of 2-epoch runs)
    with pytest.raises(KeyboardInterrupt):
        run_tasks(tasks, tmp_path, progress=_Recorder(stop_after_epochs=3))
    store = RunStore(tmp_path)
    finished = [t for t in tasks if t.done(store)]
    assert len(finished) == 1
    started = [t for t in tasks if (store.run_dir(t.config) / "checkpoint.pt").exists()]
    assert len(started) == 1 and not started[0].done(store)  # one epoch of it is stored
    stamp = {
        t.label(): (store.run_dir(t.config) / "final.json").stat().st_mtime_ns for t in finished
    }

    trained = []
    real_train = runner.train
    monkeypatch.setattr(
        runner,
        "train",
        lambda config, **kw: trained.append(config.slug()) or real_train(config, **kw),
    )
    with open(store.run_dir(started[0].config) / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a line cut short: no epoch, in the count or the run
    recorder = _Recorder()
    outcomes = run_tasks(tasks, tmp_path, progress=recorder)
    assert all(t.done(store) for t in tasks)
    assert len(trained) == 3 and finished[0].config.slug() not in trained
    assert recorder.total == 2 + 2 + 1  # epochs left: two fresh runs, one with one epoch done
    assert {o.status for o in outcomes} == {"done"}
    for t in finished:
        assert (store.run_dir(t.config) / "final.json").stat().st_mtime_ns == stamp[t.label()]
    # the interrupted run resumed from its checkpoint after epoch 1 (a second session), and
    # every run has exactly one line per epoch
    final = json.loads((store.run_dir(started[0].config) / "final.json").read_text())
    assert [session["from_epoch"] for session in final["sessions"]] == [0, 1]
    for t in tasks:
        lines = (store.run_dir(t.config) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    # and a third sweep has nothing left to do
    assert run_tasks(tasks, tmp_path) == []


def test_parallel_sweep_reports_a_failing_run_and_goes_on(tmp_path: Path) -> None:
    bad = method("broken", "w-perp", k=0)  # fails when the worker builds the estimator
    exp = _tiny(epochs=1)
    exp = Experiment(
        name="mixed",
        title="mixed",
        cells=(*exp.cells, Cell("8", "broken", bad, 8, "train_accuracy")),
        seeds=1,
        epochs=1,
    )
    recorder = _Recorder()
    outcomes = run_tasks(plan(exp, seeds=[0], epochs=1), tmp_path, jobs=2, progress=recorder)
    status = {o.task.config.method: o.status for o in outcomes}
    assert status == {"backprop": "done", "w-transpose": "done", "w-perp": "failed"}
    failed = next(o for o in outcomes if o.status == "failed")
    assert "k must be a positive integer" in failed.message
    assert (RunStore(tmp_path).run_dir(failed.task.config) / "error.log").exists()
    assert recorder.epochs == 2  # the two good runs' epochs, reported from the workers


def test_an_unwritable_cache_is_reported_once_per_sweep(tmp_path: Path, monkeypatch, capfd):
    """The sweep's process warns; its workers, which regenerate the data, stay quiet."""
    blocker = tmp_path / "a-file"
    blocker.write_text("no cache folder below a file")
    monkeypatch.setenv("GUESSGRAD_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(runner, "_DATA", None)
    tasks = plan(_tiny(epochs=1), seeds=[0], epochs=1)
    with pytest.warns(UserWarning, match="could not write the MNIST-1D cache") as caught:
        outcomes = run_tasks(tasks, tmp_path / "store", jobs=2)
    assert {o.status for o in outcomes} == {"done"}
    assert sum("MNIST-1D cache" in str(w.message) for w in caught) == 1  # this process
    assert "MNIST-1D cache" not in capfd.readouterr().err  # the two workers


def test_probe_tasks_write_measurements(tmp_path: Path) -> None:
    wt = method("W̃ᵀ", "w-transpose")
    cells = (
        Cell("W̃ᵀ", "bias", wt, 8, "bias", probe=Probe("diagnose", "init", 0, estimator=wt)),
        Cell("W̃ᵀ", "rank", wt, 8, "rank_mean", probe=Probe("overlap", "final", 1)),
        Cell("W̃ᵀ", "overlap", wt, 8, "overlap", probe=Probe("overlap", "final", 1, k=2)),
    )
    exp = Experiment(name="probes", title="probes", cells=cells, seeds=1, epochs=1)
    tasks = plan(exp, seeds=[0], epochs=1)
    assert sorted(t.kind for t in tasks) == ["probe", "probe", "train"]  # one overlap file
    outcomes = run_tasks(tasks, tmp_path)
    assert {o.status for o in outcomes} == {"done"}
    run_dir = RunStore(tmp_path).run_dir(tasks[0].config)
    diag = json.loads((run_dir / "diagnostics" / "w-transpose-init.json").read_text())
    assert len(diag["layers"]) == 3 and diag["estimator"] == "WTranspose()"
    ov = json.loads((run_dir / "diagnostics" / "overlap-final.json").read_text())
    assert len(ov["layers"][2]["overlap"]) == 8  # min(10 rows, 8 columns) directions
    assert ov["layers"][2]["rank_max"] <= 8
    markdown = report(exp, tmp_path, tmp_path, seeds=[0], epochs=1)
    row = next(line for line in markdown.splitlines() if line.startswith("| W̃ᵀ |"))
    # the table shows the stored measurements: layer 0's bias at init, layer 1's mean rank,
    # layer 1's overlap at k = 2 (the second point of its curve, which starts at k = 1)
    _, bias, rank, overlap = (cell.strip() for cell in row.strip("|").split("|"))
    assert float(bias) == pytest.approx(diag["layers"][0]["bias"], rel=5e-3)
    assert float(rank) == pytest.approx(ov["layers"][1]["rank_mean"], abs=0.05)
    curve = ov["layers"][1]["overlap"]
    assert float(overlap) == pytest.approx(curve[1], abs=5e-4)
    assert abs(curve[1] - curve[0]) > 2e-3 and abs(curve[1] - curve[2]) > 2e-3  # told apart


def test_a_sweep_tidies_finished_runs(tmp_path: Path) -> None:
    """A finished run a killed writer left a checkpoint in (killed between final.json and the
    checkpoint's removal) is tidied by the next sweep, which trains nothing."""
    wt = method("W̃ᵀ", "w-transpose")
    cell = Cell("8", "train", wt, 8, "train_accuracy")
    exp = Experiment(name="tidy", title="tidy", cells=(cell,), seeds=1, epochs=1)
    tasks = plan(exp, seeds=[0], epochs=1)
    assert {o.status for o in run_tasks(tasks, tmp_path)} == {"done"}
    run_dir = RunStore(tmp_path).run_dir(tasks[0].config)
    (run_dir / "checkpoint.pt").write_bytes(b"superseded")
    assert run_tasks(tasks, tmp_path) == []
    assert not (run_dir / "checkpoint.pt").exists()


def test_a_measurement_of_replaced_final_weights_is_stale(tmp_path: Path) -> None:
    """A run trained again (its ``final.json`` deleted) gets new weights: its old final-weight
    measurement is neither shown nor counted as done, and is measured again."""
    wt = method("W̃ᵀ", "w-transpose")
    cells = (
        Cell("8", "rank", wt, 8, "rank_mean", probe=Probe("overlap", "final", 1)),
        Cell("8", "bias", wt, 8, "bias", probe=Probe("diagnose", "init", 0, estimator=wt)),
    )
    fig = OverlapFigure("fig1.png", "overlap", wt, widths=(8,), when=("final",), k_marker=2)
    exp = Experiment(name="stale", title="stale", cells=cells, figures=(fig,), seeds=1, epochs=1)
    tasks = plan(exp, seeds=[0], epochs=1)
    assert {o.status for o in run_tasks(tasks, tmp_path)} == {"done"}
    assert "(fig1.png)" in report(exp, tmp_path, tmp_path, seeds=[0], epochs=1)
    store = RunStore(tmp_path)
    final_probe = next(t for t in tasks if t.probe is not None and t.probe.when == "final")
    init_probe = next(t for t in tasks if t.probe is not None and t.probe.when == "init")
    run_dir = store.run_dir(final_probe.config)
    record = json.loads((run_dir / final_probe.output()).read_text())
    assert record["weights_sha256"] == weights_digest(run_dir)
    assert "weights_sha256" not in json.loads((run_dir / init_probe.output()).read_text())
    # the run trained again to other weights (here: the same weights, perturbed)
    state = torch.load(run_dir / "model.pt", weights_only=True)
    torch.save({k: v + 0.5 for k, v in state.items()}, run_dir / "model.pt")
    assert not final_probe.done(store) and init_probe.done(store)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0], epochs=1)
    assert "| 8 | — | " in markdown and "(fig1.png)" not in markdown  # nor drawn
    assert "Not computed yet: overlap-final at width 8, W̃ᵀ run (seed 0)." in markdown
    outcomes = run_tasks(tasks, tmp_path)  # only the stale measurement is redone
    assert [(o.task.label(), o.status) for o in outcomes] == [(final_probe.label(), "done")]
    new = json.loads((run_dir / final_probe.output()).read_text())
    assert new["weights_sha256"] == weights_digest(run_dir) != record["weights_sha256"]
    # without a readable model.pt there is nothing to compare with: taken as it is
    (run_dir / "model.pt").rename(run_dir / "kept.pt")
    (run_dir / "model.pt").mkdir()
    assert final_probe.done(store)
    (run_dir / "model.pt").rmdir()
    assert final_probe.done(store)
    # a record without the field (an older version's) is taken as it is
    (run_dir / "kept.pt").rename(run_dir / "model.pt")
    del new["weights_sha256"]
    (run_dir / final_probe.output()).write_text(json.dumps(new))
    assert final_probe.done(store)


def test_the_sweep_that_trains_a_run_again_measures_its_new_weights(tmp_path: Path) -> None:
    """``final.json`` deleted: the run is trained again, and in the same sweep its final-weight
    measurement, taken on the weights it had at planning time, is measured again once the new
    weights are there (it was planned as done, and stayed stale)."""
    wt = method("W̃ᵀ", "w-transpose")
    cell = Cell("8", "rank", wt, 8, "rank_mean", probe=Probe("overlap", "final", 1))
    exp = Experiment(name="again", title="again", cells=(cell,), seeds=1, epochs=1)
    tasks = plan(exp, seeds=[0], epochs=1)
    assert {o.status for o in run_tasks(tasks, tmp_path)} == {"done"}
    probe = next(t for t in tasks if t.probe is not None)
    run_dir = RunStore(tmp_path).run_dir(probe.config)
    # the old weights (trained again, the run gets others: here the same weights, perturbed
    # before, so that retraining replaces them), measured on those old weights
    state = torch.load(run_dir / "model.pt", weights_only=True)
    torch.save({k: v + 0.5 for k, v in state.items()}, run_dir / "model.pt")
    record = json.loads((run_dir / probe.output()).read_text())
    record["weights_sha256"] = weights_digest(run_dir)
    atomic_write_json(run_dir / probe.output(), record)
    (run_dir / "final.json").unlink()
    store = RunStore(tmp_path)
    assert probe.done(store)  # the old weights are still there, and match the record
    (run_dir / "checkpoint.pt").write_bytes(b"an epoch of the new training")
    assert not probe.done(store)  # being trained again: the record is of the old weights
    (run_dir / "checkpoint.pt").unlink()
    outcomes = run_tasks(tasks, tmp_path)
    assert sorted(o.task.label() for o in outcomes) == sorted(t.label() for t in tasks)
    assert {o.status for o in outcomes} == {"done"}
    new = json.loads((run_dir / probe.output()).read_text())
    assert new["weights_sha256"] == weights_digest(run_dir) != record["weights_sha256"]


def test_a_failed_run_keeps_its_traceback_beside_its_probes_failures(tmp_path: Path) -> None:
    """The measurement of a run that failed fails too, into its own log: the training
    traceback stays in ``error.log``."""
    bad = method("broken", "w-perp", k=0)  # fails when the estimator is built
    cell = Cell("8", "rank", bad, 8, "rank_mean", probe=Probe("overlap", "final", 1))
    exp = Experiment(name="broken", title="broken", cells=(cell,), seeds=1, epochs=1)
    outcomes = run_tasks(plan(exp, seeds=[0], epochs=1), tmp_path)
    assert [(o.task.kind, o.status) for o in outcomes] == [("train", "failed"), ("probe", "failed")]
    run_dir = RunStore(tmp_path).run_dir(outcomes[0].task.config)
    assert "k must be a positive integer" in (run_dir / "error.log").read_text()
    probe_log = run_dir / outcomes[1].task.error_log()
    assert probe_log == run_dir / "diagnostics" / "overlap-final.error.log"
    assert "is not finished" in probe_log.read_text()


def test_a_failure_that_cannot_be_logged_is_reported_and_the_sweep_goes_on(
    tmp_path: Path, monkeypatch
) -> None:
    """An ``error.log`` that cannot be written (a read-only run folder) is a warning, not an
    exception out of the sweep: the task fails with its reason, and the next one runs."""
    bad = method("broken", "w-perp", k=0)
    good = method("backprop", "backprop")
    cells = tuple(Cell("8", m.label, m, 8, "train_accuracy") for m in (bad, good))
    exp = Experiment(name="unlogged", title="unlogged", cells=cells, seeds=1, epochs=1)
    real_write = Path.write_text

    def refused(self: Path, *args, **kwargs):
        if self.name == "error.log":
            raise PermissionError(13, "Permission denied")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refused)
    with pytest.warns(UserWarning, match=r"cannot write .*error.log: Permission denied; the fa"):
        outcomes = run_tasks(plan(exp, seeds=[0], epochs=1), tmp_path)
    status = {o.task.config.method: (o.status, o.message) for o in outcomes}
    assert status["backprop"][0] == "done"
    assert status["w-perp"][0] == "failed" and "k must be a positive integer" in status["w-perp"][1]


def test_a_damaged_output_is_not_done(tmp_path: Path) -> None:
    """A truncated ``final.json`` fails its run with the reason (not "already done" forever,
    nor a silently empty cell); a truncated measurement is measured again."""
    wt = method("W̃ᵀ", "w-transpose")
    cell = Cell("8", "rank", wt, 8, "rank_mean", probe=Probe("overlap", "final", 1))
    exp = Experiment(name="damaged", title="damaged", cells=(cell,), seeds=1, epochs=1)
    tasks = plan(exp, seeds=[0], epochs=1)
    assert {o.status for o in run_tasks(tasks, tmp_path)} == {"done"}
    store = RunStore(tmp_path)
    train_task, probe_task = sorted(tasks, key=lambda t: t.kind != "train")
    probe_file = store.run_dir(probe_task.config) / probe_task.output()
    probe_file.write_text('{"layers": [')
    assert not probe_task.done(store) and train_task.done(store)
    assert [o.status for o in run_tasks(tasks, tmp_path)] == ["done"]  # measured again
    assert json.loads(probe_file.read_text())["layers"]
    final = store.run_dir(train_task.config) / "final.json"
    kept = final.read_text()
    final.write_text('{"train_accuracy": 0.3}')  # an object, but not a run's record
    probe_file.unlink()
    outcomes = run_tasks([probe_task], tmp_path)  # no measurement of an unfinished run
    assert [o.status for o in outcomes] == ["failed"] and not probe_file.exists()
    assert (
        "is not finished" in (store.run_dir(probe_task.config) / probe_task.error_log()).read_text()
    )
    final.write_text(kept)
    final.write_text('{"train_acc')
    assert not train_task.done(store)
    outcomes = run_tasks([train_task], tmp_path)
    assert [o.status for o in outcomes] == ["failed"]
    assert "final.json" in outcomes[0].message
    assert (store.run_dir(train_task.config) / "error.log").exists()


# ---------------------------------------------------------------------------------------
# Reports from stored runs (no training)


def _store_final(root: Path, cell: Cell, seed: int, epochs: int, **values) -> None:
    config = cell.run.config(width=cell.width, seed=seed, epochs=epochs)
    payload = {
        "config": config.to_dict(),
        "estimator": "X()",
        "device": "cpu",
        "steps": 1,
        "test_accuracy": 0.0,
        **values,
    }
    atomic_write_json(RunStore(root).run_dir(config) / "final.json", payload)


def test_report_renders_stored_runs_without_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("report must not train"))
    exp = EXPERIMENTS["table3"].restrict((64,))
    wt = next(c for c in exp.cells if c.col == "W̃ᵀ" and c.section == "")
    for seed, acc in ((0, 0.30), (1, 0.32)):
        _store_final(tmp_path, wt, seed, 300, train_accuracy=acc, test_accuracy=acc - 0.1)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=300)
    assert "0.310 ± 0.014 (0.268, +0.042)" in markdown
    assert "| 64 |" in markdown and "—" in markdown  # other methods: not computed yet
    summary = json.loads((tmp_path / "table3" / "summary.json").read_text())
    cell = next(c for c in summary["cells"] if c["col"] == "W̃ᵀ" and c["section"] == "")
    assert cell["values"] == [0.30, 0.32] and cell["paper"] == 0.268
    assert cell["diff"] == pytest.approx(0.042)
    assert (tmp_path / "table3" / "table.md").read_text() == markdown
    assert (tmp_path / "table3" / "fig2.png").stat().st_size > 0


def test_report_marks_the_cells_that_differ_from_the_paper(tmp_path: Path) -> None:
    """An accuracy more than 0.03, or more than two standard deviations over seeds, from the
    paper's is marked †, with a note saying so; summary.json has the flag."""
    exp = EXPERIMENTS["table3"].restrict((64,))
    cells = {c.col: c for c in exp.cells if c.section == "" and c.quantity == "train_accuracy"}
    stored = {
        "W̃ᵀ": (0.266, 0.272),  # paper 0.268: +0.001, std 0.004: agrees
        "W̃⊥ (k=10)": (0.278, 0.280),  # paper 0.268: +0.011 < 0.03, but 7 std
        "backprop": (0.5363, 0.5363),  # paper 0.536: std 0, but below the printed digit
        "act. pert.": (0.24, 0.24),  # paper 0.201: +0.039 > 0.03
        "weight pert.": (0.131, 0.171),  # paper 0.121: +0.030 exactly, not more; 1 std
    }
    for col, values in stored.items():
        for seed, acc in enumerate(values):
            _store_final(tmp_path, cells[col], seed, 300, train_accuracy=acc)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=300)
    row = next(line for line in markdown.splitlines() if line.startswith("| 64 |"))  # train
    assert "0.269 ± 0.004 (0.268, +0.001) |" in row
    assert "0.279 ± 0.001 (0.268, +0.011) † |" in row
    assert "0.536 ± 0.000 (0.536, +0.000) |" in row
    assert "0.240 ± 0.000 (0.201, +0.039) † |" in row
    assert "0.151 ± 0.028 (0.121, +0.030) |" in row
    assert (
        "† differs from the paper by more than 2 standard deviations over seeds or by more "
        "than 0.03." in markdown
    )
    summary = json.loads((tmp_path / "table3" / "summary.json").read_text())
    flags = {c["col"]: c["flag"] for c in summary["cells"] if c["section"] == ""}
    assert flags == {
        "weight pert.": False,
        "act. pert.": True,
        "W̃ᵀ": False,
        "W̃⊥ (k=10)": True,
        "backprop": False,
    }
    # nothing to compare: a method not computed, or runs of other than the paper's 300 epochs
    assert report_module.CellResult(cells["W̃ᵀ"], [0], [None]).flagged is None
    for col, values in stored.items():
        for seed, acc in enumerate(values):
            _store_final(tmp_path, cells[col], seed, 30, train_accuracy=acc)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=30)
    assert "†" not in markdown
    summary = json.loads((tmp_path / "table3" / "summary.json").read_text())
    assert all(c["flag"] is None for c in summary["cells"])


def test_report_with_a_diverged_seed_still_writes_its_table(tmp_path: Path) -> None:
    """A seed whose loss went to NaN (training goes on after a warning) or whose measurement
    is infinite gives NaN in its cell and band, instead of stopping the report."""
    exp = EXPERIMENTS["table3"].restrict((64,))
    wt = next(c for c in exp.cells if c.col == "W̃ᵀ" and c.section == "")
    for seed, loss in ((0, 1.5), (1, float("nan"))):
        _store_final(tmp_path, wt, seed, 2, train_accuracy=0.3, test_accuracy=0.2)
        run_dir = RunStore(tmp_path).run_dir(wt.run.config(width=64, seed=seed, epochs=2))
        lines = [
            {"epoch": e, "train_loss": loss, "train_accuracy": 0.3, "test_accuracy": 0.2}
            for e in (1, 2)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=2)
    assert "0.300 ± 0.000 (0.268, +0.032)" in markdown
    assert (tmp_path / "table3" / "curves.png").stat().st_size > 0  # the band is NaN there
    table2 = EXPERIMENTS["table2"].with_preset(EXPERIMENTS["table2"].quick)
    cell = next(c for c in table2.cells if c.row == "W̃ᵀ" and c.quantity == "bias")
    for seed, bias in ((0, 5.5e-4), (1, float("inf"))):
        config = cell.run.config(width=128, seed=seed, epochs=300)
        layers = [{"bias": bias, "variance_exact": 3e-4, "cov_norm": 0.08}] * 3
        path = RunStore(tmp_path).run_dir(config) / cell.probe.file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"layers": layers}))  # Python's JSON writes Infinity
    markdown = report(table2, tmp_path, tmp_path, seeds=[0, 1], epochs=300)
    row = next(line for line in markdown.splitlines() if line.startswith("| W̃ᵀ |"))
    assert "inf ± nan" in row


def test_report_names_the_code_of_each_stored_run_once(tmp_path: Path) -> None:
    """Train and test cells share a run: it is counted once, under its version and commit."""
    exp = EXPERIMENTS["table4"].restrict((128,))
    cells = [c for c in exp.cells if c.row.startswith("W̃ᵀ")]
    assert {c.quantity for c in cells} >= {"train_accuracy", "test_accuracy"}
    code = {0: ("a" * 40, False), 1: ("a" * 40, False), 2: ("b" * 40, True)}
    for seed, (commit, modified) in code.items():
        values = {"version": "9.9", "git_commit": commit, "git_modified": modified}
        _store_final(tmp_path, cells[0], seed, 300, train_accuracy=0.3, test_accuracy=0.2, **values)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1, 2], epochs=300)
    assert (
        "2 runs with guessgrad 9.9 aaaaaaa; 1 run with guessgrad 9.9 bbbbbbb + modified files."
        in markdown
    )
    # a run resumed with other code names each version and where it took over
    session = {"version": "9.9", "git_commit": "a" * 40, "git_modified": False}
    sessions = [
        {**session, "from_epoch": 0},
        {**session, "from_epoch": 50},  # resumed with the same code: not named again
        {**session, "git_commit": "c" * 40, "from_epoch": 67},
    ]
    values = {**sessions[-1], "sessions": sessions}
    _store_final(tmp_path, cells[0], 3, 300, train_accuracy=0.3, test_accuracy=0.2, **values)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1, 2, 3], epochs=300)
    assert "; 1 run with guessgrad 9.9 aaaaaaa → 9.9 ccccccc (from epoch 67)." in markdown
    # sessions with source digests: a new commit with the same package files is not named
    digests = ("s1", "s1", "s2")
    sessions = [{**s, "source_digest": d} for s, d in zip(sessions, digests, strict=True)]
    sessions[1]["git_commit"] = "d" * 40
    values = {**sessions[-1], "sessions": sessions}
    _store_final(tmp_path, cells[0], 4, 300, train_accuracy=0.3, test_accuracy=0.2, **values)
    markdown = report(exp, tmp_path, tmp_path, seeds=[4], epochs=300)
    assert "1 run with guessgrad 9.9 aaaaaaa → 9.9 ccccccc (from epoch 67)." in markdown
    assert "\n1 seed (4), 300 epochs. " in markdown
    assert "ddddddd" not in markdown


def test_report_names_the_hardware_with_its_instruction_set(tmp_path: Path) -> None:
    """Runs recorded with the CPU kernels' instruction set show it; older records without it
    still render."""
    exp = EXPERIMENTS["table4"].restrict((128,))
    cell = next(c for c in exp.cells if c.row.startswith("W̃ᵀ"))
    cpu = {"cpu": "AMD EPYC", "torch_threads": 1, "device": "cpu"}
    for seed, hw in enumerate([{**cpu, "cpu_capability": "AVX2"}, cpu]):
        _store_final(tmp_path, cell, seed, 300, train_accuracy=0.3, hardware=hw)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=300)
    note = next(line for line in markdown.splitlines() if "Hardware of the stored runs" in line)
    assert "AMD EPYC (AVX2), 1 torch thread, device cpu; AMD EPYC, 1 torch thread," in note


def test_report_draws_learning_curves_of_finished_runs(tmp_path: Path) -> None:
    exp = EXPERIMENTS["table3"].restrict((64,))
    wt = next(c for c in exp.cells if c.col == "W̃ᵀ" and c.section == "")
    for seed in (0, 1):
        _store_final(tmp_path, wt, seed, 2, train_accuracy=0.3, test_accuracy=0.2)
        config = wt.run.config(width=64, seed=seed, epochs=2)
        lines = [
            {"epoch": e, "train_loss": 2.0, "train_accuracy": 0.3, "test_accuracy": 0.2}
            for e in (1, 2)
        ]
        metrics = RunStore(tmp_path).run_dir(config) / "metrics.jsonl"
        metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=2)
    assert "![table3](curves.png)" in markdown
    assert (tmp_path / "table3" / "curves.png").stat().st_size > 0
    # runs without per-epoch records (or not finished) draw no curves
    assert "curves.png" not in report(exp, tmp_path, tmp_path / "b", seeds=[5], epochs=2)


def _store_metrics(root: Path, cell: Cell, seed: int, epochs: int, accuracies) -> None:
    config = cell.run.config(width=cell.width, seed=seed, epochs=epochs)
    lines = [
        {"epoch": e + 1, "train_loss": 2.0, "train_accuracy": a, "test_accuracy": a - 0.1,
         "wall_seconds": 90.0 * (e + 1)}
        for e, a in enumerate(accuracies)
    ]  # fmt: skip
    metrics = RunStore(root).run_dir(config) / "metrics.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_report_lists_and_draws_unfinished_runs_apart(tmp_path: Path, monkeypatch) -> None:
    """Runs with epochs but no final.json stay out of the table; the notes and summary.json
    say how far they got, and the curves draw them under their own label."""
    exp = EXPERIMENTS["table3"].restrict((64,))
    wt = next(c for c in exp.cells if c.col == "W̃ᵀ" and c.section == "")
    _store_final(tmp_path, wt, 0, 300, train_accuracy=0.30, test_accuracy=0.20)
    _store_metrics(tmp_path, wt, 0, 300, [0.1, 0.2, 0.3])
    _store_metrics(tmp_path, wt, 1, 300, [0.1, 0.25])  # seed 1: stopped after epoch 2
    drawn, styles = {}, {}

    def draw(panels, path, title, *, colors, faded):  # noqa: ANN001, ANN202
        styles.update(colors=colors, faded=faded)
        return drawn.update(panels) or True

    monkeypatch.setattr(report_module, "draw_curves", draw)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=300)
    assert "0.300 [1/2]" in markdown  # the table: the finished run only
    assert (
        "W̃ᵀ, width 64, seed 1: epoch 2 of 300, train 0.250, test 0.150, 3.0 min of training so "
        "far, about 7.5 h left at its recent pace"  # 298 epochs of 90 s: 7.45 h
    ) in markdown
    summary = json.loads((tmp_path / "table3" / "summary.json").read_text())
    assert summary["unfinished"] == [
        {"method": "W̃ᵀ", "width": 64, "seed": 1, "run": wt.run.config(width=64, seed=1,
         epochs=300).slug(), "epoch": 2, "epochs": 300, "train_accuracy": 0.25,
         "test_accuracy": 0.15, "wall_seconds": 180.0, "seconds_left": 298 * 90.0}
    ]  # fmt: skip
    curves = drawn["width 64"]
    label = report_module._mathtext("W̃ᵀ")
    assert [len(r) for r in curves[label]] == [3]
    assert [len(r) for r in curves[f"{label} (unfinished)"]] == [2]
    # in the method's colour, faded
    assert styles["colors"][f"{label} (unfinished)"] == styles["colors"][label]
    assert styles["faded"] == {f"{label} (unfinished)"}
    # once it finishes it joins the others and the note goes
    _store_final(tmp_path, wt, 1, 300, train_accuracy=0.32, test_accuracy=0.22)
    drawn.clear()
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=300)
    assert "Unfinished" not in markdown and f"{label} (unfinished)" not in drawn["width 64"]
    assert [len(r) for r in drawn["width 64"][label]] == [3, 2]


def test_unfinished_run_time_left_follows_its_recent_pace() -> None:
    """The time left is the remaining epochs at the pace of the last PACE_EPOCHS epochs: a
    run that slowed down (a busy machine) is judged by its recent epochs, not its first."""

    def run(walls, epochs: int = 100) -> report_module.UnfinishedRun:
        records = [{"epoch": e + 1, "wall_seconds": w} for e, w in enumerate(walls)]
        return report_module.UnfinishedRun("W̃ᵀ", 64, 0, "slug", epochs, records)

    pace = report_module.PACE_EPOCHS
    fast, slow = [10.0 * e for e in range(1, 21)], []
    slow = fast + [fast[-1] + 30.0 * e for e in range(1, pace + 1)]  # 30 s per epoch lately
    assert run(fast).seconds_left() == pytest.approx(80 * 10.0)
    assert run(slow).seconds_left() == pytest.approx((100 - len(slow)) * 30.0)
    assert run([5.0]).seconds_left() is None  # one epoch: no pace yet
    assert run([None, None]).seconds_left() is None  # no timings recorded
    assert run([10.0, 20.0], epochs=2).seconds_left() == 0.0
    assert "left at its recent pace" not in run([5.0]).describe()


def test_report_draws_accuracy_against_time_per_width(tmp_path: Path) -> None:
    """Table 4's figure: one panel per width that has a run with both quantities."""
    exp = EXPERIMENTS["table4"]
    assert [f.file for f in exp.figures] == ["time_accuracy.png"]
    markdown = report(exp, tmp_path, tmp_path, seeds=[0], epochs=300)
    assert "time_accuracy.png" not in markdown  # nothing stored: no figure
    wt = next(c for c in exp.cells if c.width == 128 and c.row.startswith("W̃ᵀ"))
    _store_final(tmp_path, wt, 0, 300, wall_seconds=20.0, train_accuracy=0.3, test_accuracy=0.2)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0], epochs=300)
    assert "![table4](time_accuracy.png)" in markdown
    png = (tmp_path / "table4" / "time_accuracy.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 825  # one panel (width 128): 5.5 in at 150 dpi


def test_report_of_statistics_compares_by_ratio(tmp_path: Path) -> None:
    exp = EXPERIMENTS["table2"].with_preset(EXPERIMENTS["table2"].quick)
    cell = next(c for c in exp.cells if c.row == "W̃ᵀ" and c.quantity == "bias")
    config = cell.run.config(width=128, seed=0, epochs=300)
    layers = [{"bias": 5.5e-4, "variance_exact": 3e-4, "cov_norm": 0.08}] * 3
    atomic_write_json(RunStore(tmp_path).run_dir(config) / cell.probe.file(), {"layers": layers})
    markdown = report(exp, tmp_path, tmp_path, seeds=[0], epochs=300)
    assert "5.50e-04 (2.75e-04, ×2)" in markdown
    assert "3.00e-04 (1.50e-04, ×2)" in markdown


_SWEEP = """
import sys
from guessgrad.experiments import Cell, Experiment, method, plan, run_tasks
bp = method("backprop", "backprop")
cell = Cell(row="8", col="bp", run=bp, width=8, quantity="train_accuracy")
exp = Experiment(name="long", title="long", cells=(cell,), seeds=2, epochs=100000)
# 400 tasks: the ones no worker has taken fill more than a pipe's buffer (64 KiB) in the queue
run_tasks(plan(exp, seeds=list(range(400)), epochs=100000), sys.argv[1], jobs=2)
"""


def test_temporary_handler_puts_the_previous_handler_back() -> None:
    """Inside the block the new handler, after it the previous one, also after an exception;
    in another thread (where handlers cannot be set) the block runs with them unchanged."""
    import signal
    import threading

    def previous(signum: int, frame: object) -> None: ...

    def handler(signum: int, frame: object) -> None: ...

    saved = signal.signal(signal.SIGUSR1, previous)
    try:
        with pytest.raises(RuntimeError), runner.temporary_handler(signal.SIGUSR1, handler):
            assert signal.getsignal(signal.SIGUSR1) is handler
            raise RuntimeError
        assert signal.getsignal(signal.SIGUSR1) is previous
        seen: list[object] = []

        def in_thread() -> None:
            with runner.temporary_handler(signal.SIGUSR1, handler):
                seen.append(signal.getsignal(signal.SIGUSR1))

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        assert seen == [previous]
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, saved)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
def test_a_signal_to_the_sweep_stops_its_workers(tmp_path: Path, signame: str) -> None:
    """``kill -TERM`` of the parent alone (not its process group) ends the workers too, and the
    parent exits although hundreds of tasks were never taken from the queue.  After ``kill
    -KILL``, which the parent cannot handle, the orphaned workers stop by themselves."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sig = getattr(signal, signame)

    parent = subprocess.Popen([sys.executable, "-c", _SWEEP, str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("runs/*/metrics.jsonl"))) < 2:  # both workers training
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.2)
        own = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        workers = [pid for pid in own if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        parent.send_signal(sig)
        assert parent.wait(timeout=60) == (128 + sig if sig == signal.SIGTERM else -sig)
    finally:
        if parent.poll() is None:
            parent.kill()

    def alive(pid: str) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # never leave a stray worker behind, even when the check fails
        os.kill(int(pid), signal.SIGKILL)
    assert not left


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_worker_stops_on_sigterm_as_train_does(tmp_path: Path) -> None:
    """The sweep stops its workers with SIGTERM: a worker stops as ``train`` does on it
    (status 143, a checkpoint of the epochs it reported kept, no temporary left), not killed
    outright (status -15) wherever it stood, possibly in the middle of writing a file."""
    import multiprocessing as mp
    import queue
    import time

    from guessgrad.experiments import Cell, Experiment, method, plan

    bp = method("backprop", "backprop")
    cell = Cell(row="8", col="bp", run=bp, width=8, quantity="train_accuracy")
    exp = Experiment(name="long", title="long", cells=(cell,), seeds=1, epochs=100000)
    (task,) = plan(exp, seeds=[0], epochs=100000)
    ctx = mp.get_context("spawn")
    tasks, events = ctx.Queue(), ctx.Queue()
    tasks.put((0, task))
    proc = ctx.Process(target=runner._worker, args=(0, tasks, events, str(tmp_path), 1))
    proc.start()
    try:
        deadline, epochs = time.monotonic() + 120, 0
        while epochs < 2:
            assert time.monotonic() < deadline and proc.is_alive()
            try:
                epochs += events.get(timeout=1.0)[0] == "epoch"
            except queue.Empty:
                pass
        proc.terminate()
        proc.join(timeout=60)
        assert proc.exitcode == 143
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    (run,) = tmp_path.glob("runs/*")
    assert not (run / "final.json").exists()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] >= epochs
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def _report_sigint(answers) -> None:
    import signal

    answers.put(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_workers_are_born_ignoring_ctrl_c() -> None:
    """A worker ignores SIGINT from its start, not only once its own code runs (Ctrl-C during
    its import of torch printed a traceback); a process started plainly does not."""
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    # Python's own handler, as on a terminal, even where the tests run with SIGINT ignored (a
    # background job of a non-interactive shell is started so, and its children inherit it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for start, ignored in (
            (runner.start_ignoring_sigint, True),
            (lambda p: p.start(), False),
        ):
            proc = ctx.Process(target=_report_sigint, args=(answers,))
            start(proc)
            assert answers.get(timeout=60) is ignored
            proc.join(timeout=60)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back here
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_worker_killed_mid_run_fails_that_run_alone(tmp_path: Path) -> None:
    """A worker killed while training (``kill -9``, the out-of-memory killer) fails its run,
    which keeps its checkpoint for the next sweep, and a new worker takes the tasks still
    queued: with one worker, without that replacement they would fail too."""
    import multiprocessing as mp
    import os
    import signal
    import threading
    import time

    from guessgrad.experiments import Cell, Experiment, method, plan

    bp = method("backprop", "backprop")
    cell = Cell(row="8", col="bp", run=bp, width=8, quantity="train_accuracy")
    exp = Experiment(name="w", title="w", cells=(cell,), seeds=2, epochs=1)
    (long,) = plan(exp, seeds=[0], epochs=100000)
    short = plan(exp, seeds=[1, 2], epochs=1)
    store = RunStore(tmp_path)
    result: list = []
    sweep = threading.Thread(
        target=lambda: result.append(runner._run_pool([long, *short], store, 1, 1, None, False))
    )
    sweep.start()
    try:
        metrics = store.run_dir(long.config) / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and sweep.is_alive()
            time.sleep(0.1)
        (worker,) = mp.active_children()
        os.kill(worker.pid, signal.SIGKILL)
        sweep.join(timeout=120)
        assert not sweep.is_alive()
    finally:
        for child in mp.active_children():  # never leave a stray worker behind
            child.kill()
        sweep.join()
    status = {o.task.config.seed: (o.status, o.message) for o in result[0]}
    assert status[0] == ("failed", f"worker died (exit status {-signal.SIGKILL})")
    assert [status[s][0] for s in (1, 2)] == ["done", "done"]
    run = store.run_dir(long.config)
    assert "worker died" in (run / "error.log").read_text()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] >= 2
    assert all(store.finished(t.config) is not None for t in short)


@pytest.mark.parametrize(
    "content",
    [
        '{"train_acc',
        "[0.3]",
        '{"train_accuracy": 0.3}',
        '{"config": null, "train_accuracy": 0.3, "test_accuracy": 0.2, "steps": 1}',
        "another configuration's",
    ],
)
def test_report_names_a_damaged_final_record_instead_of_calling_the_run_unfinished(
    tmp_path: Path, content: str, monkeypatch
) -> None:
    """A final.json cut short, not an object, or without a run's fields is neither a finished
    run (reproduce fails it with the reason) nor an unfinished one to resume: the report says
    which file to look at, and warns."""
    exp = EXPERIMENTS["table3"].restrict((64,))
    wt = next(c for c in exp.cells if c.col == "W̃ᵀ" and c.section == "")
    _store_final(tmp_path, wt, 0, 300, train_accuracy=0.30, test_accuracy=0.20)
    _store_metrics(tmp_path, wt, 1, 300, [0.1, 0.25])
    damaged = RunStore(tmp_path).run_dir(wt.run.config(width=64, seed=1, epochs=300))
    if content == "another configuration's":  # a finished run left there by train --out
        other = wt.run.config(width=64, seed=1, epochs=300)
        other = dataclasses.replace(other, method="backprop", options={}, lr=0.1)
        record = {"config": other.to_dict(), "train_accuracy": 0.9, "test_accuracy": 0.8}
        content = json.dumps({**record, "steps": 1, "estimator": "Backprop()"})
    (damaged / "final.json").write_text(content)
    drawn = {}
    monkeypatch.setattr(
        report_module, "draw_curves", lambda panels, path, title, **_: drawn.update(panels) or True
    )
    with pytest.warns(UserWarning, match="cannot be read as the run's finished record"):
        markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=300)
    assert "0.300 [1/2]" in markdown and "Unfinished" not in markdown
    assert str(damaged / "final.json") in markdown
    missing = next(line for line in markdown.splitlines() if "Not computed yet" in line)
    assert "W̃ᵀ at width 64" not in missing and "weight pert. at width 64 (seeds 0, 1)" in missing
    label = report_module._mathtext("W̃ᵀ")
    assert [len(r) for r in drawn["width 64"][label]] == [0]  # seed 0: no metrics stored
    assert f"{label} (unfinished)" not in drawn["width 64"]  # seed 1 not drawn as unfinished
    assert RunStore(tmp_path).final_state(wt.run.config(width=64, seed=1, epochs=300)) == "damaged"


def test_a_method_has_one_colour_in_every_report_of_an_experiment() -> None:
    """Colours follow the full experiment's method order, whatever a preset keeps."""
    full = EXPERIMENTS["table3"].colors()
    assert list(full) == ["weight pert.", "act. pert.", "W̃ᵀ", "W̃⊥ (k=10)", "backprop"]
    narrowed = EXPERIMENTS["table3"].restrict((64,)).only_methods(("backprop",))
    assert narrowed.colors()["backprop"] == full["backprop"] == "C4"
    assert EXPERIMENTS["fig2"].colors() == full  # Fig. 2 and Table 3 draw the same runs


def test_report_names_what_is_missing_and_warns_of_other_epochs(tmp_path: Path) -> None:
    exp = EXPERIMENTS["table3"].restrict((64,)).only_methods(("backprop", "w-transpose"))
    bp = next(c for c in exp.cells if c.col == "backprop" and c.section == "")
    _store_final(tmp_path, bp, 0, 300, train_accuracy=0.5, test_accuracy=0.4)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=300)
    # train and test cells of one run count once; each run with the seeds it lacks
    assert "Not computed yet: W̃ᵀ at width 64 (seeds 0, 1); backprop at width 64 (seed 1)." in (
        markdown
    )
    assert "not comparable" not in markdown
    _store_final(tmp_path, bp, 0, 4, train_accuracy=0.2, test_accuracy=0.1)
    markdown = report(exp, tmp_path, tmp_path, seeds=[0], epochs=4)
    assert "These runs trained 4 epochs, the paper's 300: its accuracies, times" in markdown
    # a value a finished run's record lacks (here its time) is not listed: reproducing would
    # not compute it
    exp4 = EXPERIMENTS["table4"].restrict((128,)).only_methods(("w-transpose",))
    _store_final(tmp_path, exp4.cells[0], 0, 300, train_accuracy=0.3, test_accuracy=0.2)
    markdown = report(exp4, tmp_path, tmp_path, seeds=[0], epochs=300)
    assert "| — (" in markdown and "Not computed yet" not in markdown


def test_table4_draws_a_published_point_shared_by_two_rows_once(
    tmp_path: Path, monkeypatch
) -> None:
    """W̃⊥ by the exact SVD and by the fast solver carry the same published value: one
    hollow marker, in the first (SVD) row's colour."""
    exp = EXPERIMENTS["table4"].restrict((128,))
    for cell in exp.cells:
        if cell.section == "" and cell.quantity == "train_accuracy":
            _store_final(tmp_path, cell, 0, 300, train_accuracy=0.3, wall_seconds=60.0)
    figures = []
    monkeypatch.setattr(
        "matplotlib.figure.Figure.savefig", lambda fig, *a, **k: figures.append(fig)
    )
    report(exp, tmp_path, tmp_path, seeds=[0], epochs=300)
    (tradeoff,) = [f for f in figures if "against time" in f._suptitle.get_text()]
    ax = tradeoff.axes[0]
    hollow = [ln for ln in ax.lines if ln.get_markerfacecolor() == "none" and len(ln.get_xdata())]
    points = [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in hollow]
    assert len(points) == len(set(points)) == 3  # W̃⊥-NS, W̃⊥, W̃ᵀ
    colors = exp.colors()
    svd = next(
        c for c in exp.cells if c.run.label == "W̃⊥ (k=10, SVD)" and c.quantity == "train_accuracy"
    )
    wperp = next(ln for ln in hollow if ln.get_ydata()[0] == svd.paper)
    assert wperp.get_color() == colors["W̃⊥ (k=10, SVD)"]


def test_figures_draw_the_stored_means_and_the_papers_numbers(tmp_path: Path, monkeypatch) -> None:
    """Fig. 2 draws each method's mean over seeds (error bars: their std) and, dashed, the
    paper's numbers; Fig. 1 draws each hidden layer's overlap curve averaged over seeds."""
    figures = []
    monkeypatch.setattr(
        "matplotlib.figure.Figure.savefig", lambda fig, *a, **k: figures.append(fig)
    )
    exp = EXPERIMENTS["table3"].restrict((64, 128))
    wt = [c for c in exp.cells if c.col == "W̃ᵀ" and c.section == ""]
    accuracies = {64: (0.30, 0.34), 128: (0.40, 0.46)}
    for cell in wt:
        for seed, acc in enumerate(accuracies[cell.width]):
            _store_final(tmp_path, cell, seed, 300, train_accuracy=acc)
    report(exp, tmp_path, tmp_path, seeds=[0, 1], epochs=300)
    (fig2,) = [f for f in figures if f.axes and "width" == f.axes[0].get_xlabel()]
    ax = fig2.axes[0]
    label = report_module._mathtext("W̃ᵀ")
    (bars,) = [c for c in ax.containers if c.get_label() == label]
    data_line = bars.lines[0]
    assert list(data_line.get_xdata()) == [64, 128]
    assert list(data_line.get_ydata()) == pytest.approx([0.32, 0.43])
    paper = sorted((c.width, c.paper) for c in wt)
    dashed = [
        ln
        for ln in ax.lines
        if ln.get_linestyle() == "--" and ln.get_color() == data_line.get_color()
    ]
    assert [list(zip(ln.get_xdata(), ln.get_ydata())) for ln in dashed] == [paper]

    figures.clear()
    run = method("W̃ᵀ", "w-transpose")
    fig = OverlapFigure("fig1.png", "overlap", run, widths=(8,), when=("final",), k_marker=2)
    cell = Cell("8", "rank", run, 8, "rank_mean", probe=Probe("overlap", "final", 0))
    exp1 = Experiment(name="ov", title="ov", cells=(cell,), figures=(fig,), seeds=2, epochs=1)
    curves = {0: ([0.2, 0.5, 1.0], [0.1, 0.4, 1.0]), 1: ([0.4, 0.7, 1.0], [0.3, 0.6, 1.0])}
    for seed, per_layer in curves.items():
        config = run.config(width=8, seed=seed, epochs=1)
        record = {"layers": [{"overlap": c, "rank_mean": 3.0} for c in per_layer]}
        atomic_write_json(RunStore(tmp_path).run_dir(config) / cell.probe.file(), record)
    report(exp1, tmp_path, tmp_path, seeds=[0, 1], epochs=1)
    (fig1,) = figures
    drawn = [ln for ln in fig1.axes[0].lines if len(ln.get_xdata()) == 3]
    assert [list(ln.get_ydata()) for ln in drawn] == [
        pytest.approx([0.3, 0.6, 1.0]),
        pytest.approx([0.2, 0.5, 1.0]),
    ]


def test_notes_about_a_method_go_with_its_cells() -> None:
    """A note on the exact-SVD row or on W̃⊥'s solver is not shown when the row is left out."""
    full = EXPERIMENTS["table4"].note_texts()
    svd, solver = "W̃⊥ (k=10, SVD) is the paper's construction", "W̃⊥ trains with solver"
    assert any(svd in n for n in full) and any(solver in n for n in full)
    quick = EXPERIMENTS["table4"].with_preset(EXPERIMENTS["table4"].quick).note_texts()
    assert not any(svd in n for n in quick) and any(solver in n for n in quick)
    ns = EXPERIMENTS["table4"].only_methods(("w-perp-ns",)).note_texts()
    assert not any(svd in n or solver in n for n in ns)
    assert any(n.startswith("Time: training time") for n in ns)  # the notes on every row stay
