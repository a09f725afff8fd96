"""What a W̃ᵀ step costs beyond backprop's: the normal draws and fresh memory pages.

    python scripts/wtranspose_costs.py [--width 512] [--rounds 60]

Prints (1) minor page faults per estimate-plus-AdamW step of ``backprop`` and ``w-transpose``
at width ``--width``, batch 512, depth 3 (``resource.getrusage`` over 50 steps each, in a fresh
process, backprop first), (2) their step times, interleaved round by round (2 threads, median of
``--rounds``), and the ratio, (3) the time of one (width × width) standard normal draw by
``torch.randn`` against uniforms transformed by Box–Muller or by ``torch.special.ndtri`` (one
thread, median of 200).  Run it with and without glibc's
``MALLOC_TRIM_THRESHOLD_``/``MALLOC_TOP_PAD_`` to see what heap trimming costs.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import torch

import guessgrad as gg
from guessgrad.bench import median_seconds


def _median_ms(fn, repeat: int) -> float:
    return median_seconds(fn, repeat) * 1e3


def draws(width: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    n = width * width

    def box_muller() -> torch.Tensor:
        u = torch.rand(2, n // 2, generator=gen)
        r = u[0].log_().mul_(-2).sqrt_()
        theta = u[1].mul_(2 * math.pi)
        return torch.cat([r * theta.cos(), r * theta.sin()])

    return {
        "randn": _median_ms(lambda: torch.randn(width, width, generator=gen), 200),
        "rand + Box-Muller": _median_ms(box_muller, 200),
        "rand + ndtri": _median_ms(
            lambda: torch.special.ndtri(torch.rand(width, width, generator=gen)), 200
        ),
    }


def _stepper(name: str, width: int, x: torch.Tensor, y: torch.Tensor):
    model = gg.MLP([x.shape[1], width, width, width, 10])
    est = gg.make_estimator(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        est.estimate(model, x, y, generator=gen)
        opt.step()

    for _ in range(10):
        step()
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    data = gg.data.mnist1d()
    x, y = data.x_train[:512], data.y_train[:512]
    steps = {name: _stepper(name, args.width, x, y) for name in ("backprop", "w-transpose")}
    for name, step in steps.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            step()
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50
        print(f"{name}: {faults:.0f} minor page faults per step")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    print(
        f"step (2 threads, median of {args.rounds} interleaved): backprop {ms['backprop']:.2f} ms, "
        f"w-transpose {ms['w-transpose']:.2f} ms, ratio {ms['w-transpose'] / ms['backprop']:.3f}"
    )
    torch.set_num_threads(1)
    for name, draw_ms in draws(args.width).items():
        print(f"{name}: {draw_ms:.2f} ms for {args.width} x {args.width} (1 thread)")


if __name__ == "__main__":
    main()
