"""``guessgrad bench`` on tiny settings: records, interleaved timing, memory, fidelity, JSON."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from guessgrad.bench import bench_methods, markdown, parse_method
from guessgrad.cli import main as cli_main

SETTINGS = dict(width=16, depth=2, batch_size=32, steps=2, warmup=1, device=torch.device("cpu"))


def test_parse_method_reads_options():
    assert parse_method("w-perp:solver=svd:k=3") == ("w-perp", {"solver": "svd", "k": 3})
    with pytest.raises(ValueError, match="key=value"):
        parse_method("w-perp:svd")


def test_bench_methods_records():
    records = bench_methods(["backprop", "w-transpose", "w-perp:k=3"], memory=False, **SETTINGS)
    assert [r.method for r in records] == ["backprop", "w-transpose", "w-perp:k=3"]
    for r in records:
        assert r.step_seconds_median > 0 and r.step_seconds_iqr >= 0
        assert r.peak_memory_bytes is None
    assert records[0].fidelity is None and records[1].fidelity is None
    assert 0.5 < records[2].fidelity <= 1.0 + 1e-6  # k = 3 of 16: a real Krylov solve
    assert records[2].solver == "subspace"
    table = markdown(records)
    assert "| w-perp:k=3 | subspace |" in table and "× w-transpose" in table


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU memory read from /proc")
def test_bench_cpu_memory_is_measured_in_a_child():
    (record,) = bench_methods(["w-transpose"], **{**SETTINGS, "width": 256, "batch_size": 256})
    # one step holds several (256 × 256) float32 tensors: at least a few hundred KiB
    assert record.peak_memory_bytes is not None and record.peak_memory_bytes > 2**18


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
            "--json",
        ]
    )
    assert code == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in records] == ["backprop", "w-perp:k=2"]
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
    }
