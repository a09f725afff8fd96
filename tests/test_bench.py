"""``guessgrad bench`` on tiny settings: records, interleaved timing, memory, fidelity, JSON."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from guessgrad import MLP, make_estimator
from guessgrad.bench import (
    BenchRecord,
    bench_methods,
    bench_units,
    layer_fidelities,
    markdown,
    parse_method,
)
from guessgrad.cli import main as cli_main

SETTINGS = dict(width=16, depth=2, batch_size=32, steps=2, warmup=1, device=torch.device("cpu"))


def test_parse_method_reads_options():
    assert parse_method("w-perp:solver=svd:k=3") == ("w-perp", {"solver": "svd", "k": 3})
    assert parse_method("w-perp:chunk=None:k=rank") == ("w-perp", {"chunk": None, "k": "rank"})
    assert parse_method("w-precond:sigma=1e-3") == ("w-precond", {"sigma": 1e-3})
    with pytest.raises(ValueError, match="key=value"):
        parse_method("w-perp:svd")


def test_bench_methods_records():
    specs, seen = ["backprop", "w-transpose", "w-perp:k=3"], []
    records = bench_methods(specs, memory=False, on_progress=seen.append, **SETTINGS)
    # progress: one call per unit of work, in order, as many as bench_units counts
    units = bench_units(3, steps=SETTINGS["steps"], warmup=SETTINGS["warmup"], memory=False)
    assert len(seen) == units and seen[-1] == "w-perp:k=3: fidelity"
    assert seen[SETTINGS["warmup"] * 3] == "backprop: timed steps"
    assert [r.method for r in records] == ["backprop", "w-transpose", "w-perp:k=3"]
    for r in records:
        assert r.step_seconds_median > 0 and r.step_seconds_iqr >= 0
        assert r.peak_memory_bytes is None
    assert records[0].fidelity is None and records[1].fidelity is None
    assert 0.5 < records[2].fidelity <= 1.0 + 1e-6  # k = 3 of 16: a real Krylov solve
    assert records[2].solver == "subspace"
    table = markdown(records)
    assert "| w-perp:k=3 | subspace |" in table and "× w-transpose" in table


def test_bench_table_rows_and_ratios():
    """Each row: milliseconds, the time ratios to w-transpose and to backprop (in that
    order), MiB, the memory ratio to w-transpose; "–" where a figure or its base is absent."""

    def record(method, seconds, iqr, mib, fidelity=None):
        return BenchRecord(
            method=method,
            solver="subspace" if fidelity is not None else None,
            width=8,
            batch_size=4,
            device="cpu",
            step_seconds_median=seconds,
            step_seconds_iqr=iqr,
            peak_memory_bytes=None if mib is None else int(mib * 2**20),
            fidelity=fidelity,
            depth=3,
            threads=1,
            torch="x",
        )

    records = [
        record("backprop", 0.001, 0.0001, 1.0),
        record("w-transpose", 0.002, 0.0002, 4.0),
        record("w-perp", 0.010, 0.001, 6.0, fidelity=0.98765),
    ]
    lines = markdown(records).splitlines()
    assert lines[2] == "| backprop | – | 1.00 | 0.10 | 0.50 | 1.00 | 1.0 | 0.25 | – |"
    assert lines[3] == "| w-transpose | – | 2.00 | 0.20 | 1.00 | 2.00 | 4.0 | 1.00 | – |"
    assert lines[4] == "| w-perp | subspace | 10.00 | 1.00 | 5.00 | 10.00 | 6.0 | 1.50 | 0.9877 |"
    alone = markdown([record("w-perp", 0.010, 0.001, None, fidelity=0.5)]).splitlines()
    assert alone[2] == "| w-perp | subspace | 10.00 | 1.00 | – | – | – | – | 0.5000 |"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU memory read from /proc")
def test_bench_cpu_memory_is_measured_in_a_child():
    (record,) = bench_methods(["w-transpose"], **{**SETTINGS, "width": 256, "batch_size": 256})
    # one step holds several (256 × 256) float32 tensors of 256 KiB each (activations, masks,
    # guesses, tangents): more than glibc's free heap space can hold, so each is a mapping of
    # its own and counted (tensors of a few tens of KiB may not be: see the module docstring)
    assert record.peak_memory_bytes is not None and record.peak_memory_bytes >= 4 * 2**18
    # and it is the step's own: the process's resident set (the interpreter and PyTorch,
    # hundreds of MiB) is not counted
    assert record.peak_memory_bytes < 64 * 2**20


def test_bench_cli_json(capsys):
    code = cli_main(
        [
            "bench",
            "--methods",
            "backprop,w-perp:k=2",
            "--width",
            "8",
            "--depth",
            "2",
            "--batch-size",
            "16",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--json",
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert [r["method"] for r in records] == ["backprop", "w-perp:k=2"]
    # not a terminal: plain progress lines on stderr, the last one at the end
    lines = err.splitlines()
    assert lines and all(line.startswith("bench: ") for line in lines)
    assert lines[-1].startswith("bench: 8/8 (w-perp:k=2: memory)")
    assert set(records[0]) == {
        "method",
        "solver",
        "width",
        "batch_size",
        "device",
        "step_seconds_median",
        "step_seconds_iqr",
        "peak_memory_bytes",
        "fidelity",
        "depth",
        "threads",
        "torch",
    }
    assert (records[0]["depth"], records[0]["threads"]) == (2, 1)
    assert records[0]["torch"] == torch.__version__


def test_layer_fidelities_per_hidden_layer_and_state_untouched():
    """The exact SVD has fidelity 1 on every layer solved by a basis; closed-form layers (next
    layer with at most k rows) are left out; the estimator's warm start is not moved."""
    torch.manual_seed(0)
    model = MLP([6, 16, 16, 12, 3])  # layers 0, 1: W̃ with 16 and 12 rows; layer 2: 3 rows
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    exact = layer_fidelities(make_estimator("w-perp", k=4, solver="svd"), model, x, y)
    assert exact is not None and set(exact) == {0, 1}
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in exact.values())
    fast = make_estimator("w-perp", k=4)
    fast.estimate(model, x, y, generator=torch.Generator().manual_seed(0))
    before = {i: {k: v.clone() for k, v in s.items()} for i, s in fast.state.items()}
    values = layer_fidelities(fast, model, x, y)
    assert values is not None and set(values) == {0, 1}
    assert all(0.5 < v <= 1.0 + 1e-6 for v in values.values())
    assert fast.state.keys() == before.keys()
    for i, s in before.items():
        for key, v in s.items():
            assert torch.equal(fast.state[i][key], v)
    assert layer_fidelities(make_estimator("w-transpose"), model, x, y) is None


def test_bench_median_and_iqr_are_those_of_the_timed_steps(monkeypatch):
    """Step times 1, 1, 1, 2 and 10 s (a faked clock; skewed, so that the mean, 3 s, and the
    range, 9 s, differ from them): median 1 s, quartiles 1 and 2 s, IQR 1 s — within the
    sample's range, never extrapolated beyond it."""
    import guessgrad.bench as bench

    ticks = iter(range(10_000))
    durations = iter([1.0, 10.0, 1.0, 2.0, 1.0])
    now = [0.0]

    def clock() -> float:
        # two readings per timed step (start, end): the end is the start plus the next duration
        now[0] += next(durations) if next(ticks) % 2 else 0.0
        return now[0]

    monkeypatch.setattr(bench.time, "perf_counter", clock)
    (record,) = bench_methods(["backprop"], memory=False, **{**SETTINGS, "steps": 5})
    assert record.step_seconds_median == 1.0
    assert record.step_seconds_iqr == 1.0
