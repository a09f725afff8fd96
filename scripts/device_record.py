"""One timed session on an accelerator: benchmarks, then Table 4's runs in order of priority.

    python scripts/device_record.py --device cuda --budget 540 --store results-gpu --out OUT

1. ``guessgrad bench`` at widths 512 and 128 (backprop, w-transpose, activation-perturbation,
   w-perp, w-perp-ns side by side), written to ``OUT/bench.json`` and ``OUT/bench.md``.
2. Table 4's training runs (``guessgrad reproduce table4``'s configurations, 300 epochs) into
   the run store ``--store``, one at a time so that each run's wall time is its own: first the
   pair behind the accelerator target (w-transpose and w-perp at width 512, seed 0), then
   width 128, then W̃⊥-NS at width 512, then more seeds.  A run is started only if the
   benchmark's step time says it ends within ``--budget`` seconds of the script's start.
   After every run the store's JSON files are packed into ``OUT/store.tar.gz``, so that a
   session cut short keeps every finished run; ``guessgrad report table4 --out STORE``
   renders the table from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import tarfile
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
    p.add_argument("--store", type=Path, default=Path("results-gpu"), help="run store")
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
    for width in (int(w) for w in args.widths.split(",")):
        try:
            recs = bench_methods(
                args.methods.split(","),
                width=width,
                depth=3,
                batch_size=512,
                steps=args.bench_steps,
                warmup=3,
                device=device,
            )
        except Exception:  # the runs below still go ahead, unestimated
            traceback.print_exc()
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
        per_step = step_time.get(key[:2])
        left = args.budget - (time.perf_counter() - t0)
        # steps, plus about 1 % for evaluation and checkpoints; unbenchmarked: started anyway
        need = 1.01 * per_step * steps_per_epoch * args.epochs if per_step else 0.0
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
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
