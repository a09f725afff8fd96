"""``guessgrad bench``: step time, peak memory and subspace fidelity, side by side.

For each method, in one process and on the same model and batch: a few warm-up steps, then
the median and interquartile range of the wall time of one estimate-plus-``AdamW.step``
(device-synchronised; the methods' timed steps interleaved round by round), the peak
memory of one step, and for W̃⊥ solvers the subspace energy fidelity

    F = mean_b tr(Vᵀ G_b V) / Σ_{j≤k} λ_j(G_b),    G_b = W̃_bᵀ W̃_b,

(1.0 = the exact top-k subspace), averaged over the hidden layers whose subspace is not
computed in closed form.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step minus the memory
allocated before it.  On CPU (Linux), measured in a fresh child process per method: glibc's
mmap threshold is fixed at one page (4 KiB) before anything is allocated, so a tensor of that
size or more gets its own mapping, returned on free, unless free heap space can hold it, and the
resident set tracks live allocations to within a page each (smaller ones are not counted; a step
whose tensors are all a few tens of KiB reads low, down to 0); the figure is the peak
resident set size during one step (after the same warm-up) minus the resident size before it,
read from ``/proc/self/status`` after resetting the peak with ``/proc/self/clear_refs``.  The
child keeps that allocator setting out of the timed steps, where a mapping per tensor would add
page faults to every method.
``None`` elsewhere.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import option_value
from .data import mnist1d
from .estimators import Estimator, ForwardGradient, make_estimator
from .guesses import Site, WPerpGuess
from .metrics import subspace_fidelity
from .models import MLP, linear_layers

__all__ = [
    "BenchRecord",
    "parse_method",
    "bench_methods",
    "layer_fidelities",
    "median_seconds",
    "markdown",
    "bench_units",
]


@dataclass(frozen=True)
class BenchRecord:
    method: str
    solver: str | None
    width: int
    batch_size: int
    device: str
    step_seconds_median: float
    step_seconds_iqr: float
    peak_memory_bytes: int | None
    fidelity: float | None
    #: what else decides the figures
    depth: int
    threads: int
    torch: str


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``fn`` after one untimed call (no device
    synchronisation: for CPU code, as in the scripts that time single operations)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"w-perp:solver=svd:k=10"`` → ``("w-perp", {"solver": "svd", "k": 10})``."""
    name, *pairs = spec.strip().split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"bad method option {pair!r} in {spec!r}: expected key=value")
        key, value = pair.split("=", 1)
        options[key] = option_value(value)  # e.g. w-perp:chunk=None
    return name, options


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _fix_mmap_threshold() -> None:
    # glibc raises its mmap threshold after large frees, after which freed tensors stay in
    # the heap and the resident size stops tracking live memory; a fixed threshold of one page
    # puts each allocation of a page or more that free heap space cannot hold in its own
    # mapping, returned to the system on free (64 KiB left every tensor of a width-16 step out)
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        m_mmap_threshold = -3
        ctypes.CDLL(name).mallopt(m_mmap_threshold, 4096)


def _peak_memory(step: Any, device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set size
            before = _status_bytes("VmRSS")
            step()
            return _status_bytes("VmHWM") - before
        except OSError:
            return None
    return None


def _cpu_memory_child(kwargs: dict[str, Any]) -> int | None:
    _fix_mmap_threshold()  # before any tensor exists
    torch.set_num_threads(kwargs.pop("threads"))
    setup = _setup(**kwargs)
    for _ in range(kwargs["warmup"]):
        setup.step()
    return _peak_memory(setup.step, torch.device("cpu"))


def _cpu_peak_memory(**kwargs: Any) -> int | None:
    """:func:`_peak_memory` of one step, measured in a fresh process (see the module doc)."""
    if not sys.platform.startswith("linux"):
        return None
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_cpu_memory_child, ({**kwargs, "threads": torch.get_num_threads()},))


def layer_fidelities(
    est: Estimator, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor
) -> dict[int, float] | None:
    """Subspace energy fidelity of ``est``'s W̃⊥ solver per hidden layer, on the batch ``x``,
    ``y`` with the estimator's current state (warm starts); the state is left as it was.

    ``None`` for estimators without a top-k W̃⊥ guess; layers whose subspace is computed in
    closed form (next layer with at most k rows) are left out, as exact.
    """
    if not isinstance(est, ForwardGradient) or not isinstance(est.guess, WPerpGuess):
        return None
    guess = est.guess
    if guess.k == "rank" or guess.subspace != "top":
        return None
    k = int(guess.k)
    values: dict[int, float] = {}

    def on_site(site: Site, g: Any, state: dict[str, Any]) -> None:
        if site.jacobian is None or site.jacobian.rows <= k:
            return  # output layer, or the closed form (exact)
        basis, _ = guess.basis(site, state)
        values[site.index] = subspace_fidelity(site.jacobian.dense(), basis, k)

    saved = {i: dict(s) for i, s in est.state.items()}
    with torch.no_grad():
        est.tangent_pass(linear_layers(model), x, y, on_site=on_site)
    est.state = saved
    return values


def _fidelity(
    est: Estimator, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor
) -> float | None:
    """The mean of :func:`layer_fidelities` over layers (1.0 when all are closed-form)."""
    values = layer_fidelities(est, model, x, y)
    if values is None:
        return None
    return sum(values.values()) / len(values) if values else 1.0


@dataclass
class _Setup:
    est: Estimator
    model: nn.Sequential
    x: torch.Tensor
    y: torch.Tensor
    step: Any


def _setup(
    spec: str,
    *,
    width: int,
    depth: int,
    batch_size: int,
    warmup: int,
    device: torch.device,
    seed: int,
) -> _Setup:
    """Estimator, model, batch and one-step closure; all depend on ``seed`` only."""
    name, options = parse_method(spec)
    est = make_estimator(name, **options)
    data = mnist1d()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, data.x_train.shape[0], (batch_size,), generator=gen)
    x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
    torch.manual_seed(seed)
    model = MLP([x.shape[1]] + [width] * depth + [10]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    guess_gen = torch.Generator(device=device).manual_seed(seed + 1)

    def step() -> None:
        est.estimate(model, x, y, generator=guess_gen)
        opt.step()

    return _Setup(est, model, x, y, step)


def bench_methods(
    specs: list[str],
    *,
    width: int,
    depth: int,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    seed: int = 0,
    memory: bool = True,
    on_progress: Callable[[str], None] | None = None,
) -> list[BenchRecord]:
    """Time several methods side by side; model, batch and initial weights depend on ``seed``.

    The timed steps are interleaved (one step of every method per round, ``steps`` rounds),
    so that a slow period of a shared machine hits every method alike and the ratios stay
    fair.  ``memory=False`` skips the peak-memory measurement (``peak_memory_bytes`` is
    ``None``).  ``on_progress(what)`` is called after each unit of work, of which there are
    :func:`bench_units`: every warm-up and timed step, and each method's fidelity and memory
    measurement.
    """
    done = on_progress if on_progress is not None else (lambda _what: None)
    configs = [
        dict(
            spec=spec,
            width=width,
            depth=depth,
            batch_size=batch_size,
            warmup=warmup,
            device=device,
            seed=seed,
        )
        for spec in specs
    ]
    setups = [_setup(**config) for config in configs]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for spec, setup in zip(specs, setups):
        for _ in range(warmup):
            setup.step()
            done(f"{spec}: warm-up")
    sync()
    times: list[list[float]] = [[] for _ in setups]
    for _ in range(steps):
        for spec, setup, record in zip(specs, setups, times):
            t0 = time.perf_counter()
            setup.step()
            sync()
            record.append(time.perf_counter() - t0)
            done(f"{spec}: timed steps")
    records = []
    for config, setup, ts in zip(configs, setups, times):
        fidelity = _fidelity(setup.est, setup.model, setup.x, setup.y)
        done(f"{config['spec']}: fidelity")
        peak = None
        if memory:
            peak = (
                _cpu_peak_memory(**config)
                if device.type == "cpu"
                else _peak_memory(setup.step, device)
            )
            done(f"{config['spec']}: memory")
        # quartiles within the sample's range ("exclusive", the default, extrapolates beyond
        # it for a few steps and overstates the spread)
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
        records.append(
            BenchRecord(
                method=str(config["spec"]),
                solver=getattr(getattr(setup.est, "guess", None), "solver", None),
                width=width,
                batch_size=batch_size,
                device=str(device),
                step_seconds_median=statistics.median(ts),
                step_seconds_iqr=q[2] - q[0],
                peak_memory_bytes=peak,
                fidelity=fidelity,
                depth=depth,
                threads=torch.get_num_threads(),
                torch=torch.__version__,
            )
        )
    return records


def bench_units(methods: int, *, steps: int, warmup: int, memory: bool = True) -> int:
    """How many times :func:`bench_methods` calls ``on_progress``."""
    return methods * (warmup + steps + 1 + int(memory))


def markdown(records: list[BenchRecord]) -> str:
    """A Markdown table with ratios to ``w-transpose`` and ``backprop`` where present."""
    ref = {r.method: r for r in records}
    head = (
        "| method | solver | step (ms) | IQR (ms) | × w-transpose | × backprop "
        "| peak MiB | × w-transpose mem | fidelity |"
    )
    lines = [head, "|" + "---|" * 9]

    def ratio(r: BenchRecord, base: str, attr: str) -> str:
        b = ref.get(base)
        num, den = getattr(r, attr), getattr(b, attr) if b else None
        return f"{num / den:.2f}" if num is not None and den else "–"

    for r in records:
        mem = f"{r.peak_memory_bytes / 2**20:.1f}" if r.peak_memory_bytes is not None else "–"
        fid = f"{r.fidelity:.4f}" if r.fidelity is not None else "–"
        lines.append(
            f"| {r.method} | {r.solver or '–'} | {r.step_seconds_median * 1e3:.2f} | "
            f"{r.step_seconds_iqr * 1e3:.2f} | {ratio(r, 'w-transpose', 'step_seconds_median')} | "
            f"{ratio(r, 'backprop', 'step_seconds_median')} | {mem} | "
            f"{ratio(r, 'w-transpose', 'peak_memory_bytes')} | {fid} |"
        )
    return "\n".join(lines)
