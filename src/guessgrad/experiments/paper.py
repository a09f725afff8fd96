"""The paper's published numbers (its tables) and its experiments, as data.

Source: D. Wang, E. Markou, D. Campbell, "Towards Scalable Backpropagation-Free Gradient
Estimation", arXiv 2511.03110.  Every table and figure of §5 becomes an :class:`Experiment`:
a grid of training runs (method × width; seeds and epochs filled in at run time) and the
number each table cell reads from them.  Runs are shared between experiments through the
run store (``OUT/runs/<TrainConfig.slug()>``): Table 3 and Fig. 2 use the same runs, and
Tables 1, 2, 4, 5 and Fig. 1 reuse them wherever the configurations coincide.

Choices the paper leaves open, made here and repeated in every table's notes:

- Diagnostics (Tables 2 and 5) are measured by :func:`guessgrad.diagnose` on a fixed batch,
  the first :data:`DIAG_BATCH` training examples (one batch of the paper's size), with
  :data:`DIAG_SAMPLES` guesses per example, in the first hidden layer.  Variance is the
  exact Gaussian expectation of Eq. 18 (``variance_exact``), bias is exact Eq. 17.
- Table 2 compares three estimators, so it measures all three on the same weights: those at
  the end of the W̃⊥ (k=10) training run at width 128, and, in a second table, at
  initialisation (shared by every method).  Table 5 pairs statistics with accuracies, so each
  method is measured on the weights at the end of its own run.  W̃⊥ statistics use the exact
  SVD, the paper's construction, whatever solver trained the run.
- "k = rank" (Table 1) is the per-example rank of W̃_b: the guess spans W̃_b's whole row
  space.  It trains with the same solver as the other W̃⊥ columns; the fast one has a closed
  form for it (the active units; the class rows' span for the last hidden layer), the same
  Gaussian law as the exact SVD truncated at ``torch.linalg.matrix_rank``'s tolerance.
- Fig. 1 shows the overlap at the end of the W̃⊥ (k=10) run, whose mean ranks of W̃ are the
  paper's (at initialisation the second layer's is near half the width, not the paper's
  three quarters), and at initialisation for reference.
"""

from __future__ import annotations

from typing import Any

from ..estimators import make_estimator
from .spec import (
    Cell,
    Experiment,
    Method,
    Note,
    OverlapFigure,
    Preset,
    Probe,
    TradeoffFigure,
    WidthFigure,
    method,
)

__all__ = [
    "TABLE1",
    "TABLE2",
    "TABLE3",
    "TABLE4",
    "TABLE5",
    "FIG1_MEAN_RANK",
    "FIG1_OVERLAP_AT_10",
    "EXPERIMENTS",
    "DIAG_BATCH",
    "DIAG_SAMPLES",
    "W_PERP_SOLVER",
    "default_options",
]

# ---------------------------------------------------------------------------------------
# The paper's published numbers, keyed by the labels used below.

#: Table 1: train accuracy after 300 epochs vs k, width 128
TABLE1: dict[str, float] = {
    "W̃ᵀ": 0.312,
    "W̃⊥ (k=rank)": 0.311,
    "W̃⊥ (k=25)": 0.323,
    "W̃⊥ (k=10)": 0.324,
    "W̃⊥ (k=1)": 0.275,
}

#: Table 2: hidden-layer statistics at width 128 (inferred from the cov. norm)
TABLE2: dict[str, dict[str, float]] = {
    "W̃ᵀ": {"variance_exact": 1.50e-4, "bias": 2.75e-4, "cov_norm": 0.084},
    "W̃⊥-bottom": {"variance_exact": 1.30e-5, "bias": 2.83e-4, "cov_norm": 0.085},
    "W̃⊥ (k=10)": {"variance_exact": 1.03e-5, "bias": 2.86e-5, "cov_norm": 0.085},
}

#: Table 3 / Fig. 2: train accuracy after 300 epochs, by width then method
TABLE3: dict[int, dict[str, float]] = {
    64: {"weight pert.": 0.121, "act. pert.": 0.201, "W̃ᵀ": 0.268, "W̃⊥ (k=10)": 0.268,
         "backprop": 0.536},
    128: {"weight pert.": 0.124, "act. pert.": 0.275, "W̃ᵀ": 0.312, "W̃⊥ (k=10)": 0.323,
          "backprop": 0.709},
    256: {"weight pert.": 0.179, "act. pert.": 0.309, "W̃ᵀ": 0.376, "W̃⊥ (k=10)": 0.434,
          "backprop": 0.887},
    512: {"weight pert.": 0.177, "act. pert.": 0.319, "W̃ᵀ": 0.494, "W̃⊥ (k=10)": 0.581,
          "backprop": 1.000},
}  # fmt: skip

#: Table 4: (method, width) -> wall time in seconds (M1 Pro, unoptimised), train, test
TABLE4: dict[tuple[str, int], dict[str, float]] = {
    ("W̃⊥-NS", 512): {"wall_seconds": 6 * 3600, "train_accuracy": 0.594, "test_accuracy": 0.477},
    ("W̃⊥ (k=10)", 512): {"wall_seconds": 40 * 3600, "train_accuracy": 0.581,
                          "test_accuracy": 0.498},
    ("W̃ᵀ", 512): {"wall_seconds": 26 * 60, "train_accuracy": 0.486, "test_accuracy": 0.438},
    ("W̃⊥-NS", 128): {"wall_seconds": 9 * 60, "train_accuracy": 0.326, "test_accuracy": 0.291},
    ("W̃⊥ (k=10)", 128): {"wall_seconds": 3600, "train_accuracy": 0.324, "test_accuracy": 0.283},
    ("W̃ᵀ", 128): {"wall_seconds": 5 * 60, "train_accuracy": 0.312, "test_accuracy": 0.277},
}  # fmt: skip

#: Table 5: width 256, first hidden layer
TABLE5: dict[str, dict[str, float]] = {
    "W̃⊥ (k=10)": {"variance_exact": 6.33e-6, "bias": 3.63e-5, "train_accuracy": 0.433,
                   "test_accuracy": 0.383},
    "W̃P": {"variance_exact": 1.75e-4, "bias": 1.35e-8, "train_accuracy": 0.367,
            "test_accuracy": 0.314},
    "W̃ᵀ": {"variance_exact": 7.04e-5, "bias": 1.68e-4, "train_accuracy": 0.375,
            "test_accuracy": 0.316},
}  # fmt: skip

#: Fig. 1: mean rank of W̃ per hidden layer, by width
FIG1_MEAN_RANK: dict[int, tuple[int, int, int]] = {128: (64, 97, 10), 512: (260, 387, 10)}
#: Fig. 1: the overlap at k = 10 is "about 0.85–0.95" for every curve
FIG1_OVERLAP_AT_10: tuple[float, float] = (0.85, 0.95)

# ---------------------------------------------------------------------------------------
# Measurement settings.

#: diagnostics batch: the first DIAG_BATCH training examples
DIAG_BATCH = 512
#: guesses per example for the Monte-Carlo statistics of ``diagnose``
DIAG_SAMPLES = 16
#: the hidden layer of Tables 2 and 5 (0 = first hidden layer)
DIAG_LAYER = 0

_DEFAULT_SOLVER: str = make_estimator("w-perp", k=10).options()["solver"]
#: the solver W̃⊥ trains with: the estimator's default unless that is the slow exact SVD.
#: It is passed explicitly, so that run directories name it and do not change meaning when
#: the default does.
W_PERP_SOLVER: str = "subspace" if _DEFAULT_SOLVER == "svd" else _DEFAULT_SOLVER
_FAST = {"solver": W_PERP_SOLVER}

# ---------------------------------------------------------------------------------------
# Methods, under the paper's labels.  ``cost`` (time per step relative to backprop at width
# 128 on a CPU, roughly) orders runs slowest first, nothing else.

BACKPROP = method("backprop", "backprop")
WEIGHT_PERT = method("weight pert.", "weight-perturbation")
ACT_PERT = method("act. pert.", "activation-perturbation")
W_T = method("W̃ᵀ", "w-transpose")
W_PERP = method("W̃⊥ (k=10)", "w-perp", cost=40, k=10, **_FAST)
W_PERP_25 = method("W̃⊥ (k=25)", "w-perp", cost=130, k=25, **_FAST)
W_PERP_1 = method("W̃⊥ (k=1)", "w-perp", cost=12, k=1, **_FAST)
W_PERP_RANK = method("W̃⊥ (k=rank)", "w-perp", cost=5, k="rank", **_FAST)
W_PERP_SVD = method("W̃⊥ (k=10, SVD)", "w-perp", cost=300, k=10, solver="svd")
W_PERP_BOTTOM = method("W̃⊥-bottom", "w-perp-bottom", cost=560, k=10, solver="svd")
W_PERP_NS = method("W̃⊥-NS", "w-perp-ns", cost=600)
W_PRECOND = method("W̃P", "w-precond", cost=3, sigma=1e-5)

#: each registry name as the experiments run it by default (its options name run directories)
_DEFAULT_METHODS = {
    m.name: m
    for m in (BACKPROP, WEIGHT_PERT, ACT_PERT, W_T, W_PERP, W_PERP_BOTTOM, W_PERP_NS, W_PRECOND)
}


def default_options(name: str) -> dict[str, Any]:
    """The options the experiments give the registry method ``name`` where the paper names no
    other (W̃⊥: k = 10 and the fast solver; W̃P: σ = 1e-5), so that ``guessgrad train`` without
    them names its run as the experiments do and each reuses the other's runs."""
    found = _DEFAULT_METHODS.get(name)
    return found.kwargs if found is not None else {}


#: the exact-SVD twin of a probe, for the statistics of W̃⊥ (the paper's construction)
_EXACT_PROBE: dict[Method, Method] = {W_PERP: method("W̃⊥ (k=10)", "w-perp", k=10, solver="svd")}


def _probe_of(m: Method) -> Method:
    return _EXACT_PROBE.get(m, m)


_STAT_COLS = (("variance", "variance_exact"), ("bias", "bias"), ("cov. norm", "cov_norm"))
_ACC_COLS = (("train", "train_accuracy"), ("test", "test_accuracy"))

_DIAG_NOTE = (
    f"Statistics: guessgrad.diagnose on the first {DIAG_BATCH} training examples, "
    f"{DIAG_SAMPLES} guesses per example, first hidden layer; variance = exact Gaussian "
    "expectation of Eq. 18, bias = Eq. 17, cov. norm = sqrt(mean_b ‖C_b − I‖_F²)/d. "
    "W̃⊥ statistics use the exact SVD (the paper's construction)."
)
_W_PERP_NOTE = Note(
    f"W̃⊥ trains with solver {W_PERP_SOLVER!r}"
    + (
        " (the estimator's default is the exact SVD, seconds per step)."
        if _DEFAULT_SOLVER == "svd"
        else " (the estimator's default)."
    ),
    (W_PERP, W_PERP_25, W_PERP_1, W_PERP_RANK),
)

# ---------------------------------------------------------------------------------------
# The experiments.

_T1_METHODS = (W_T, W_PERP_RANK, W_PERP_25, W_PERP, W_PERP_1)
TABLE1_EXPERIMENT = Experiment(
    name="table1",
    row_header="accuracy",
    title="Table 1: train accuracy vs k, width 128",
    cells=tuple(
        Cell(row=row, col=m.label, run=m, width=128, quantity=q, paper=paper)
        for row, q in (("train", "train_accuracy"), ("test", "test_accuracy"))
        for m in _T1_METHODS
        for paper in [TABLE1[m.label] if q == "train_accuracy" else None]
    ),
    notes=(
        Note(
            "k = rank: per example, the rank of W̃_b, so the guess spans W̃_b's whole row "
            "space, which holds the gradient: unbiased. Same solver as the other W̃⊥ columns: "
            "the fast solver's closed form for it (the active units, or for the last hidden "
            "layer the span of the 10 class rows) has the same law as the exact SVD truncated "
            "at torch.linalg.matrix_rank's tolerance, without any SVD.",
            (W_PERP_RANK,),
        ),
        _W_PERP_NOTE,
    ),
    quick=Preset(seeds=1, note="one seed."),
)

_T2_PROBES = (W_T, W_PERP_BOTTOM, _probe_of(W_PERP))
TABLE2_EXPERIMENT = Experiment(
    name="table2",
    row_header="method",
    title="Table 2: hidden-layer statistics, width 128",
    cells=tuple(
        Cell(
            row=p.label,
            col=col,
            run=W_PERP,
            width=128,
            quantity=q,
            paper=TABLE2[p.label][q],
            probe=Probe("diagnose", when, DIAG_LAYER, estimator=p),
            section=section,
        )
        for section, when in (
            ("end of training (weights of the W̃⊥ (k=10) run)", "final"),
            ("at initialisation", "init"),
        )
        for p in _T2_PROBES
        for col, q in _STAT_COLS
    ),
    notes=(
        "All three estimators are measured on the same weights: at the end of the "
        "W̃⊥ (k=10) training run at width 128, and at initialisation (the same for every "
        "method with the same seed). The paper does not say when or on which data it "
        "measured.",
        _DIAG_NOTE,
        _W_PERP_NOTE,
    ),
    quick=Preset(
        seeds=1,
        note="one seed (its W̃⊥ run at width 128 is also Table 3's quick run).",
    ),
)

_T3_METHODS = (WEIGHT_PERT, ACT_PERT, W_T, W_PERP, BACKPROP)
_WIDTHS = (64, 128, 256, 512)
_TABLE3_CELLS = tuple(
    Cell(row=str(w), col=m.label, run=m, width=w, quantity=q, paper=paper, section=section)
    for section, q in (("", "train_accuracy"), ("test accuracy", "test_accuracy"))
    for w in _WIDTHS
    for m in _T3_METHODS
    for paper in [TABLE3[w][m.label] if q == "train_accuracy" else None]
)
_FIG2 = WidthFigure(
    file="fig2.png",
    title="MNIST-1D train accuracy vs width",
    quantity="train_accuracy",
    ylabel="train accuracy",
)
_TABLE3_QUICK = Preset(
    seeds=1,
    widths=(64, 128),
    note="one seed, widths 64 and 128, all five methods.",
)
TABLE3_EXPERIMENT = Experiment(
    name="table3",
    row_header="width",
    title="Table 3: train and test accuracy vs width",
    cells=_TABLE3_CELLS,
    figures=(_FIG2,),
    notes=("Every method starts from the backprop run's initial weights (same seed).",
           _W_PERP_NOTE),
    quick=_TABLE3_QUICK,
)  # fmt: skip

FIG2_EXPERIMENT = Experiment(
    name="fig2",
    row_header="width",
    title="Figure 2: train accuracy vs width (Table 3's runs)",
    cells=tuple(c for c in _TABLE3_CELLS if c.section == ""),
    figures=(_FIG2,),
    notes=TABLE3_EXPERIMENT.notes,
    quick=_TABLE3_QUICK,
)

_T4_ROWS = (
    (W_PERP_NS, 512, "W̃⊥-NS"),
    (W_PERP_SVD, 512, "W̃⊥ (k=10)"),
    (W_PERP, 512, "W̃⊥ (k=10)"),
    (W_T, 512, "W̃ᵀ"),
    (W_PERP_NS, 128, "W̃⊥-NS"),
    (W_PERP_SVD, 128, "W̃⊥ (k=10)"),
    (W_PERP, 128, "W̃⊥ (k=10)"),
    (W_T, 128, "W̃ᵀ"),
)
TABLE4_EXPERIMENT = Experiment(
    name="table4",
    row_header="method",
    title="Table 4: wall time and accuracy",
    cells=tuple(
        Cell(
            row=f"{m.label}, width {w}",
            col=col,
            run=m,
            width=w,
            quantity=q,
            paper=TABLE4[(paper_label, w)][q],
        )
        for m, w, paper_label in _T4_ROWS
        for col, q in (("time", "wall_seconds"), *_ACC_COLS)
    ),
    figures=(TradeoffFigure(file="time_accuracy.png", title="Table 4: accuracy against time"),),
    notes=(
        "Time: training time of the run (final.json wall_seconds: the optimisation steps, "
        "without the per-epoch evaluation); the paper's is an M1 Pro laptop with MPS and "
        "the SVD on its CPU. Beside each time: the paper's, and ours as a multiple of it.",
        Note(
            "W̃⊥ (k=10, SVD) is the paper's construction (one exact SVD per example); "
            "W̃⊥ (k=10) is the same guess with the fast solver; both are compared with the "
            "paper's W̃⊥ row.",
            (W_PERP_SVD,),
        ),
        _W_PERP_NOTE,
    ),
    quick=Preset(
        seeds=1,
        widths=(128,),
        drop=("W̃⊥ (k=10, SVD)",),
        note="one seed, width 128, without the exact-SVD row (seconds per step on a CPU).",
    ),
)

_T5_METHODS = (W_PERP, W_PRECOND, W_T)


def _table5_cell(m: Method, col: str, q: str, when: str, section: str) -> Cell:
    stat = q in ("variance_exact", "bias")
    probe = Probe("diagnose", when, DIAG_LAYER, estimator=_probe_of(m)) if stat else None
    return Cell(m.label, col, m, 256, q, TABLE5[m.label][q], probe, section)


TABLE5_EXPERIMENT = Experiment(
    name="table5",
    row_header="method",
    title="Table 5: statistics and accuracy, width 256, first hidden layer",
    cells=tuple(
        _table5_cell(m, col, q, when, section)
        for section, when, cols in (
            ("", "final", _STAT_COLS[:2] + _ACC_COLS),
            ("at initialisation", "init", _STAT_COLS[:2]),
        )
        for m in _T5_METHODS
        for col, q in cols
    ),
    notes=(
        "Each method's statistics are measured on the weights at the end of its own run "
        "(first table; the accuracies are of the same run) and at initialisation (second "
        "table, weights shared by all methods).",
        _DIAG_NOTE,
        _W_PERP_NOTE,
    ),
    quick=Preset(seeds=1, note="one seed."),
)

_FIG1_WIDTHS = (128, 512)
FIG1_EXPERIMENT = Experiment(
    name="fig1",
    row_header="width, layer",
    title="Figure 1: overlap of the true gradient with the top-k subspace of W̃",
    cells=tuple(
        Cell(
            row=f"width {w}, layer {layer + 1}",
            col=f"{label} ({'init' if when == 'init' else 'end'})",
            run=W_PERP,
            width=w,
            quantity=q,
            paper=FIG1_MEAN_RANK[w][layer] if q == "rank_mean" and when == "final" else None,
            probe=Probe("overlap", when, layer, k=10 if q == "overlap" else None),
        )
        for w in _FIG1_WIDTHS
        for layer in range(3)
        for when in ("init", "final")
        for label, q in (("mean rank", "rank_mean"), ("overlap k=10", "overlap"))
    ),
    figures=(
        OverlapFigure(
            file="fig1.png",
            title="Overlap of g with the top-k right singular subspace of W̃",
            run=W_PERP,
            widths=_FIG1_WIDTHS,
            when=("init", "final"),
            k_marker=10,
            paper_rank=FIG1_MEAN_RANK,
            paper_overlap=FIG1_OVERLAP_AT_10,
        ),
    ),
    notes=(
        "Overlap (Eq. 19): mean over the first "
        f"{DIAG_BATCH} training examples of ‖V_kᵀ g_b‖²/‖g_b‖², V_k from the exact SVD of "
        "W̃_b, at initialisation and at the end of the W̃⊥ (k=10) run. The paper reads "
        f"{FIG1_OVERLAP_AT_10[0]}–{FIG1_OVERLAP_AT_10[1]} at k = 10 for every curve.",
        "Mean rank: mean over examples of the numerical rank of W̃_b "
        "(torch.linalg.matrix_rank's tolerance). The paper's ranks (64 / 97 / 10 at width "
        "128) are those of trained weights: at initialisation about half the units of every "
        "hidden layer are active, so the second layer's rank is near 64, not 97. The "
        "end-of-training values (solid curves) are therefore the comparison; initialisation "
        "(dotted) is shown for reference.",
        _W_PERP_NOTE,
    ),
    quick=Preset(
        seeds=1,
        widths=(128,),
        note="one seed, width 128 (its W̃⊥ run is also Table 3's quick run).",
    ),
)

#: every experiment by name, in the order ``all`` runs them
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        TABLE1_EXPERIMENT,
        TABLE2_EXPERIMENT,
        TABLE3_EXPERIMENT,
        TABLE4_EXPERIMENT,
        TABLE5_EXPERIMENT,
        FIG1_EXPERIMENT,
        FIG2_EXPERIMENT,
    )
}
