"""Benchmarks, then Table 4's runs in order of priority, on an accelerator within a time budget.

    python scripts/device_record.py --device cuda --budget 540 --out OUT

1. ``guessgrad bench`` at widths 512 and 128 (backprop, w-transpose, activation-perturbation,
   w-perp, w-perp-ns side by side), written to ``OUT/bench.json`` and ``OUT/bench.md``.
2. Table 4's training runs (``guessgrad reproduce table4``'s configurations, 300 epochs) into
   the run store ``--store``, one at a time so that each run's wall time is its own: first the
   pair behind the accelerator target (w-transpose and w-perp at width 512, seed 0), then
   width 128, then W̃⊥-NS at width 512, then more seeds.  A run is started only if the
   benchmark's step time (or, without one, the other width's scaled by width²) says it ends
   within ``--budget`` seconds of the script's start, evaluation and checkpoints included; a
   run with no estimate at all is not started.  After every run the store's JSON files are
   packed into ``OUT/store.tar.gz``, so that a run of this script cut short keeps every
   finished run; ``guessgrad report table4 --out STORE`` renders the table from them.
3. ``OUT/summary.json``, rewritten after every run: the card, torch and CUDA versions, each
   finished run's time and accuracies, and the ratio of the width-512 w-perp run's time to the
   w-transpose run's (the accelerator target, at most 2).

The budget counts from the script's start: give it the time that is left, e.g.
``--budget $((540 - SECONDS))`` after a set-up in the same shell.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import torch

from guessgrad.bench import bench_methods, markdown
from guessgrad.data import mnist1d
from guessgrad.experiments.paper import TABLE4_EXPERIMENT
from guessgrad.experiments.runner import RunStore, execute, plan
from guessgrad.training import resolve_device

BENCH_METHODS = [
    "backprop",
    "w-transpose",
    "activation-perturbation",
    "w-perp",
    "w-perp:chunk=512",
    "w-perp-ns",
]
#: order of the runs: (method name, width, seed); the exact-SVD W̃⊥ runs are left out
PRIORITY = [
    ("w-transpose", 512, 0),
    ("w-perp", 512, 0),
    ("w-transpose", 128, 0),
    ("w-perp", 128, 0),
    ("w-perp-ns", 128, 0),
    ("w-perp-ns", 512, 0),
    *((m, 128, s) for s in (1, 2) for m in ("w-transpose", "w-perp", "w-perp-ns")),
    *((m, 512, s) for s in (1, 2) for m in ("w-transpose", "w-perp")),
    *(("w-perp-ns", 512, s) for s in (1, 2)),
]


def pack(store: Path, out: Path) -> None:
    """The store's JSON and JSONL files into ``out/store.tar.gz``, replaced atomically."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(store.rglob("*")):
            if path.is_file() and path.suffix in (".json", ".jsonl", ".log"):
                tar.add(path, arcname=str(path.relative_to(store.parent)))
    tmp = out / "store.tar.gz.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out / "store.tar.gz")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="auto, cpu, cuda or mps")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole script")
    p.add_argument(
        "--store",
        type=Path,
        default=Path(tempfile.gettempdir()) / "guessgrad-device-store",
        help="run store (default: a temporary folder, so that no local run travels with the "
        "working tree and passes for one made on the device)",
    )
    p.add_argument("--out", type=Path, required=True, help="bench files, packed store")
    p.add_argument("--epochs", type=int, default=300, help="epochs per training run")
    p.add_argument("--widths", default="512,128", help="bench widths")
    p.add_argument("--bench-steps", type=int, default=30)
    p.add_argument("--methods", default=",".join(BENCH_METHODS), help="bench methods")
    args = p.parse_args()
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, device {device}", flush=True)
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), flush=True)

    records = []
    methods = args.methods.split(",")
    for width in (int(w) for w in args.widths.split(",")):
        recs = _bench(methods, width, args.bench_steps, device)
        if not recs:
            continue
        records += recs
        print(f"\nwidth {width} ({time.perf_counter() - t0:.0f} s)\n{markdown(recs)}", flush=True)
        (args.out / "bench.json").write_text(
            json.dumps([dataclasses.asdict(r) for r in records], indent=1)
        )
        (args.out / "bench.md").write_text(
            "\n\n".join(
                f"width {w}\n\n{markdown([r for r in records if r.width == w])}"
                for w in sorted({r.width for r in records})
            )
        )
    # the default solver's step time (the first w-perp record of a width)
    step_time: dict[tuple[str, int], float] = {}
    for r in records:
        step_time.setdefault((r.method, r.width), r.step_seconds_median)

    data = mnist1d()
    steps_per_epoch = math.ceil(data.x_train.shape[0] / 512)
    tasks = {
        (t.config.method, t.config.width, t.config.seed): t
        for t in plan(TABLE4_EXPERIMENT, seeds=(0, 1, 2), epochs=args.epochs, device=str(device))
        if t.config.options.get("solver") != "svd"
    }
    store = RunStore(args.store)
    for key in PRIORITY:
        task = tasks.get(key)
        if task is None or task.done(store):
            continue
        per_step = _step_estimate(step_time, key[0], key[1])
        left = args.budget - (time.perf_counter() - t0)
        if per_step is None:
            print(f"skip {task.label()}: no step time to estimate it by", flush=True)
            continue
        need = run_seconds(per_step, steps_per_epoch * args.epochs, args.epochs)
        if need > left:
            print(f"skip {task.label()}: needs ≈ {need:.0f} s, {left:.0f} s left", flush=True)
            continue
        outcome = execute(task, args.store)
        print(
            f"{outcome.status} {task.label()} in {outcome.seconds:.0f} s (predicted {need:.0f}) "
            f"{outcome.result or outcome.message}",
            flush=True,
        )
        pack(args.store, args.out)
        write_summary(store, tasks, device, args.out)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


def _bench(methods: list[str], width: int, steps: int, device: torch.device) -> list:
    """The bench records of ``methods`` at ``width``, side by side; where that fails, each
    method alone, so that one failing method costs only its own record."""
    kwargs = {"width": width, "depth": 3, "batch_size": 512, "steps": steps, "warmup": 3}
    try:
        return bench_methods(methods, device=device, **kwargs)
    except Exception:
        traceback.print_exc()
    records = []
    for m in methods:
        try:
            records += bench_methods([m], device=device, **kwargs)
        except Exception:
            traceback.print_exc()
    return records


def _step_estimate(
    step_time: dict[tuple[str, int], float], method: str, width: int
) -> float | None:
    """The benchmark's step time of ``method`` at ``width``; else another width's, scaled by
    width² (the products' cost) with a margin of 1.5; ``None`` without any."""
    if (method, width) in step_time:
        return step_time[(method, width)]
    others = [(w, t) for (m, w), t in step_time.items() if m == method]
    if not others:
        return None
    w, t = max(others)
    return 1.5 * t * max(1.0, (width / w) ** 2)


def run_seconds(per_step: float, steps: int, epochs: int) -> float:
    """A run's expected wall time: its steps plus 1 %, and per epoch the evaluation and the
    checkpoint (about 0.05 s), and 10 s of first-call costs."""
    return 1.01 * per_step * steps + 0.05 * epochs + 10.0


def write_summary(store: RunStore, tasks: dict, device: torch.device, out: Path) -> None:
    """``out/summary.json``: the card, the versions, every finished run's time and accuracies,
    and the width-512 w-perp ÷ w-transpose time ratio (seed 0) once both are there."""
    runs = {}
    for key, task in tasks.items():
        final = store.finished(task.config)
        if final is not None:
            runs[key] = {
                k: final.get(k) for k in ("wall_seconds", "train_accuracy", "test_accuracy")
            }
    wp, wt = runs.get(("w-perp", 512, 0)), runs.get(("w-transpose", 512, 0))
    ratio = None
    if wp and wt and wp["wall_seconds"] and wt["wall_seconds"]:
        ratio = wp["wall_seconds"] / wt["wall_seconds"]
    summary = {
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "runs": [{"method": m, "width": w, "seed": s, **r} for (m, w, s), r in runs.items()],
        "w512_wperp_over_wtranspose": ratio,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
