"""The Newton–Schulz core of W̃⊥-NS (paper §2.6): the matrix polynomial acts on singular
values as its scalar definition, the shipped fit is the step it documents, and the σ_1, σ_k/σ_1
and factor helpers agree with dense references."""

from __future__ import annotations

import importlib.util
import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch

from guessgrad.solvers import newton_schulz as ns
from guessgrad.solvers.newton_schulz import (
    coefficients_for,
    gram_newton_schulz,
    load_coefficients,
    newton_schulz,
    ns_factor,
    ns_gram_apply,
    ns_rows,
    ns_step_function,
    odd_polynomial,
    power_iteration_sigma1,
    power_sigma1,
    q_bound,
    sigma_ratio,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fit_ns_coefficients.py"

#: the sanity bounds the fit must meet, whatever the rerun: max error outside the band for
#: t = 0.1 … 0.9.  Small thresholds are hard (near 0, p(x) ≈ a x only separates ratios).
# docs/newton_schulz.md: "for t = 0.5–0.8 every set is within 1% of the step outside its band,
# and t = 0.9 within 1.2%"
MAX_ERROR_BOUND = {0.1: 0.3, 0.2: 0.2, 0.3: 0.15, 0.4: 0.05, 0.9: 0.012}
MAX_ERROR_BOUND_HIGH = 0.01  # t = 0.5–0.8


@pytest.fixture(scope="module")
def table():
    return load_coefficients()


@pytest.fixture(scope="module")
def doc():
    text = resources.files("guessgrad.solvers").joinpath("ns_coefficients.json").read_text()
    return json.loads(text)


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``(rows, cols)`` with orthonormal columns (rows ≥ cols)."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def with_singular_values(s: torch.Tensor, m: int, n: int, gen: torch.Generator):
    """X = U diag(s) Vᵀ (m × n) with random U (m × r), V (n × r), r = len(s)."""
    u, v = orthonormal(m, len(s), gen), orthonormal(n, len(s), gen)
    return (u * s) @ v.T, u, v


# --- the polynomial and the matrix function ---------------------------------------------------


def test_odd_polynomial_definition(table):
    a, b, c, d = coeffs = table.coefficients[4]
    x = torch.linspace(-1.15, 1.15, 101, dtype=torch.float64)
    expected = a * x + b * x**3 + c * x**5 + d * x**7
    torch.testing.assert_close(odd_polynomial(x, coeffs), expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(odd_polynomial(-x, coeffs), -odd_polynomial(x, coeffs))
    twice = odd_polynomial(odd_polynomial(x, coeffs), coeffs)
    torch.testing.assert_close(ns_step_function(x, coeffs, 2), twice)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (7, 7)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("set_index", [2, 6])
def test_matrix_function_acts_on_singular_values(table, shape, set_index):
    """newton_schulz(U diag(s) Vᵀ) = U diag(p^N(s)) Vᵀ: same singular vectors, values p^N(s)."""
    gen = torch.Generator().manual_seed(set_index)
    m, n = shape
    s = torch.tensor([1.12, 1.0, 0.71, 0.45, 0.2, 0.05, 0.0][: min(m, n)], dtype=torch.float64)
    x, u, v = with_singular_values(s, m, n, gen)
    coeffs = table.coefficients[set_index]
    out = newton_schulz(x.unsqueeze(0), coeffs, table.iterations)[0]
    f = ns_step_function(s, coeffs, table.iterations)
    torch.testing.assert_close(out, (u * f) @ v.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.linalg.svdvals(out), f.abs().sort(descending=True).values, rtol=0, atol=1e-12
    )


def test_newton_schulz_batched_and_dtype(table):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    x = x / torch.linalg.matrix_norm(x, ord=2)[:, None, None]
    coeffs = table.coefficients[5]
    out = newton_schulz(x, coeffs, 5)
    for b in range(3):
        torch.testing.assert_close(out[b], newton_schulz(x[b : b + 1], coeffs, 5)[0])
        torch.testing.assert_close(out[b], newton_schulz(x[b], coeffs, 5))  # one matrix
        torch.testing.assert_close(out[b].mT, newton_schulz(x[b].mT, coeffs, 5))  # tall
    stacked = newton_schulz(x.view(1, 3, 5, 8), coeffs, 5)  # more batch dimensions
    torch.testing.assert_close(stacked[0], out)
    out32 = newton_schulz(x.float(), coeffs, 5)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, rtol=0, atol=1e-4)
    assert torch.equal(newton_schulz(x, coeffs, 0), x)


@pytest.mark.parametrize("shape", [(9, 6), (6, 9), (7, 7)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("set_index", [0, 5, 8])
def test_gram_newton_schulz_is_the_matrix_polynomial(table, shape, set_index):
    """From A = XᵀX and rows u X alone: A_N = p^N(X)ᵀp^N(X) and u p^N(X), against the X
    iteration in float64 (rank-deficient X, several rows u, a zero matrix in the batch)."""
    gen = torch.Generator().manual_seed(10 + set_index)
    m, n = shape
    s = torch.tensor([1.1, 0.97, 0.62, 0.33, 0.08, 0.0][: min(m, n)], dtype=torch.float64)
    x = torch.stack([with_singular_values(s, m, n, gen)[0], torch.zeros(m, n).double()])
    u = torch.randn(2, 3, m, generator=gen, dtype=torch.float64)
    coeffs = table.coefficients[set_index]
    ref = newton_schulz(x, coeffs, table.iterations)
    gram, rows = gram_newton_schulz(x.mT @ x, coeffs, table.iterations, u @ x)
    torch.testing.assert_close(rows, u @ ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gram, ref.mT @ ref, rtol=0, atol=1e-10)
    for n in (table.iterations, 2, 1, 0):  # the last step on the rows alone
        rows_n, ok = ns_rows(x.mT @ x, coeffs, n, u @ x, table.domain[1])
        torch.testing.assert_close(rows_n, u @ newton_schulz(x, coeffs, n), rtol=0, atol=1e-10)
        assert ok.tolist() == [True, True]
    same = gram_newton_schulz(x.mT @ x, coeffs, 0, u @ x)
    assert torch.equal(same[1], u @ x)
    with pytest.raises(ValueError, match="rows"):
        gram_newton_schulz(x.mT @ x, coeffs, 1, torch.zeros(2, 3, n + 1).double())


def test_q_bound_is_the_max_of_q_on_the_interval(table):
    """q_bound = max |a + bλ + cλ² + dλ³| on [0, x_max²], against a fine grid."""
    x_max = table.domain[1]
    lam = torch.linspace(0.0, x_max**2, 400_001, dtype=torch.float64)
    for a, b, c, d in [*table.coefficients, (2.0, -1.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0)]:
        grid = float((a + lam * (b + lam * (c + lam * d))).abs().max())
        bound = q_bound((a, b, c, d), x_max)
        assert grid <= bound <= grid + 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ns_rows_bounds_hold_inside_and_fail_outside(table, dtype):
    """Every set keeps ``ok`` on spectra inside [0, x_max] (x_max itself, steep and flat,
    rank-deficient, zero), in float32 too; spectra past x_max that blow up are flagged."""
    gen = torch.Generator().manual_seed(21)
    x_max = table.domain[1]
    spectra = [
        [x_max, x_max, 0.5, 0.0],
        [1.0, 0.3, 0.01, 1e-4],
        [0.999, 0.998, 0.997, 0.996],
        [0.0, 0.0, 0.0, 0.0],
    ]
    x = torch.stack([with_singular_values(torch.tensor(v).double(), 7, 5, gen)[0] for v in spectra])
    u = torch.randn(len(spectra), 2, 7, generator=gen, dtype=torch.float64)
    for coeffs in table.coefficients:
        g, r = (x.mT @ x).to(dtype), (u @ x).to(dtype)
        assert bool(ns_rows(g, coeffs, table.iterations, r, x_max)[1].all())
    # the trace bound alone: every singular value 1.2 > x_max = 1.15, rows that see nothing
    eye = (1.2**2 * torch.eye(5, dtype=torch.float64))[None].to(dtype)
    zero_rows = torch.zeros(1, 2, 5, dtype=dtype)
    assert ns_rows(eye, table.coefficients[4], table.iterations, zero_rows, x_max)[1].tolist() == [
        False
    ]
    low = coefficients_for(0.55, table)  # blows up just past x_max (see the doc's safety net)
    far = x / 0.7
    assert not bool(torch.isfinite(newton_schulz(far, low, table.iterations)).all())
    ok = ns_rows(far.mT @ far, low, table.iterations, u @ far, x_max)[1]
    assert ok.tolist() == [False, False, False, True]  # the zero matrix stays zero
    # one step past x_max with a small trace: only the last step's growth can tell
    one = with_singular_values(torch.tensor([2.0, 0.0, 0.0, 0.0]).double(), 7, 5, gen)[0]
    assert float((one.mT @ one).trace()) <= x_max**2 * 5
    ok = ns_rows((one.mT @ one)[None], low, 1, (u[:1] @ one), x_max)[1]
    assert ok.tolist() == [False]


def test_ns_gram_apply_is_the_factor_and_redoes_low_sigma(table):
    """u F_b from the Gram matrix equals u p^N(W̃_b/σ̂_b) (float64); a σ̂_b far below σ_1,
    which blows the composition up, is redone with the exact σ_1."""
    gen = torch.Generator().manual_seed(12)
    s = torch.tensor([2.0, 1.8, 0.6, 0.2], dtype=torch.float64)
    w = torch.stack([with_singular_values(s * c, 8, 10, gen)[0] for c in (1.0, 3.0, 1.5)])
    u = torch.randn(3, 2, 8, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([1.9, 6.0, 2.1], dtype=torch.float64)  # the last: 30% low
    coeffs = coefficients_for(0.55, table)
    out = ns_gram_apply(w.mT @ w, u @ w, sigma, 0.55, table)
    # example 2 redone with σ_1 = 3.0 (≠ 1, so that σ_1 and σ_1² cannot be confused)
    for b, sig in enumerate([1.9, 6.0, 3.0]):
        ref = newton_schulz(w[b] / sig, coeffs, table.iterations)
        torch.testing.assert_close(out[b], u[b] @ ref, rtol=0, atol=1e-9)
    assert not bool(torch.isfinite(newton_schulz(w[2] / 2.1, coeffs, table.iterations)).all())
    zero = ns_gram_apply(torch.zeros(1, 10, 10), torch.zeros(1, 1, 10), torch.zeros(1), 0.5, table)
    assert torch.equal(zero, torch.zeros(1, 1, 10))


# --- the shipped fit -----------------------------------------------------------------------------


def test_fit_file_is_consistent(table, doc):
    assert (table.degree, table.iterations) == (7, 5)
    assert table.thresholds == pytest.approx([0.1 * j for j in range(1, 10)])
    assert doc["fit"]["command"] == "python scripts/fit_ns_coefficients.py"
    spec = importlib.util.spec_from_file_location("fit_ns_coefficients", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # importable: does no work at import
    assert table.domain == (0.0, script.X_MAX)
    for t, band in zip(table.thresholds, table.bands):
        assert band == pytest.approx(script.band(t))


def test_fitted_step_within_documented_error(table, doc):
    """p^N ≈ 0 up to the band and ≈ 1 from t to the domain's end, within the JSON's errors,
    recomputed here on the same grid; and those errors meet the bounds stated above."""
    x = torch.linspace(*table.domain, doc["fit"]["evaluation_points"], dtype=torch.float64)
    for t, coeffs, (lo, hi), mx, rms in zip(
        table.thresholds, table.coefficients, table.bands, table.max_errors, table.rms_errors
    ):
        f = ns_step_function(x, coeffs, table.iterations)
        outside = (x <= lo) | (x >= hi)
        err = (f - (x >= hi).double())[outside].abs()
        assert float(err.max()) == pytest.approx(mx, rel=1e-9, abs=1e-12)
        assert float(err.pow(2).mean().sqrt()) == pytest.approx(rms, rel=1e-9, abs=1e-12)
        assert mx <= MAX_ERROR_BOUND.get(round(t, 1), MAX_ERROR_BOUND_HIGH), t


def test_polynomial_keeps_domain_invariant(table):
    """|p| ≤ x_max on [0, x_max] (p odd), so no composition leaves [−x_max, x_max]."""
    x_max = table.domain[1]
    x = torch.linspace(0.0, x_max, 200_001, dtype=torch.float64)
    for coeffs in table.coefficients:
        assert float(odd_polynomial(x, coeffs).abs().max()) <= x_max + 1e-6
        assert float(ns_step_function(x, coeffs, 20).abs().max()) <= x_max + 1e-6


def test_the_fitting_script_reproduces_a_shipped_set(table, doc):
    """The script, run for one threshold (t = 0.6; each threshold's fit is its own), gives the
    shipped coefficients and errors: the JSON is what the script makes."""
    spec = importlib.util.spec_from_file_location("fit_ns_coefficients", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (fitted,) = script.fit((0.6,))
    shipped = next(s for s in doc["sets"] if s["threshold"] == 0.6)
    assert fitted["band"] == pytest.approx(shipped["band"], abs=1e-12)
    assert fitted["coefficients"] == pytest.approx(shipped["coefficients"], rel=1e-6, abs=1e-6)
    for key in ("max_error_outside_band", "rms_error_outside_band", "max_abs_p_on_domain"):
        assert fitted[key] == pytest.approx(shipped[key], rel=1e-5), key


def test_fit_jacobian_matches_autograd():
    """The fitting script's chain-rule Jacobian of p^j equals autograd's (float64)."""
    spec = importlib.util.spec_from_file_location("fit_ns_coefficients", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    coeffs = torch.tensor([[0.3, 4.5, -6.8, 2.8], [1.2, 2.0, -4.0, 1.5]], dtype=torch.float64)
    x = torch.linspace(0.0, 1.1, 23, dtype=torch.float64)
    values, jacobians = script.compositions(coeffs, x, 3, jacobian=True)
    for j in range(3):
        auto = torch.autograd.functional.jacobian(
            lambda c, j=j: script.compositions(c, x, 3)[0][j], coeffs
        )  # (2, G, 2, 4)
        torch.testing.assert_close(jacobians[j], torch.stack([auto[i, :, i] for i in range(2)]))


# --- bins, σ_1 and σ_k/σ_1 --------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio, threshold",
    [(0.0, 0.1), (0.05, 0.1), (0.1, 0.1), (0.37, 0.3), (0.7, 0.7), (0.99, 0.9), (1.0, 0.9)],
)
def test_coefficients_for_bins(table, ratio, threshold):
    index = table.thresholds.index(pytest.approx(threshold))
    assert coefficients_for(ratio, table) == table.coefficients[index]


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_coefficients_for_rejects(table, bad):
    with pytest.raises(ValueError, match="sigma_ratio"):
        coefficients_for(bad, table)


def test_power_iteration_matches_spectral_norm():
    gen = torch.Generator().manual_seed(1)
    # a clear gap (σ_2/σ_1 = 0.5): 20 iterations converge to machine precision
    s = torch.tensor([3.0, 1.5, 1.0, 0.2], dtype=torch.float64)
    gapped = torch.stack([with_singular_values(s, 7, 11, gen)[0] for _ in range(3)])
    torch.testing.assert_close(power_iteration_sigma1(gapped), torch.full((3,), 3.0).double())
    # Gaussian matrices, small gaps: never above σ_1 (a Rayleigh quotient), at most 10 % below
    # (about 6 % for the worst of these 16), 1 % below on average
    w = torch.randn(16, 12, 20, generator=gen, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(w, ord=2)
    est = power_iteration_sigma1(w)
    assert bool((est <= exact * (1 + 1e-12)).all())
    assert bool((est >= 0.9 * exact).all())
    assert float((1 - est / exact).mean()) < 0.01
    zero = power_iteration_sigma1(torch.zeros(2, 4, 3))
    assert torch.equal(zero, torch.zeros(2))
    # the same iteration through a map G_b v (a masked shared Gram, as MaskedLinearJacobian's)
    mask = (torch.rand(16, 20, generator=gen) > 0.4).double()
    start = torch.randn(20, generator=gen, dtype=torch.float64).expand(16, -1) * mask
    shared = w[0].T @ w[0]
    via_map = power_sigma1(lambda v: (v @ shared) * mask, start)
    dense = w[0].expand(16, -1, -1) * mask.unsqueeze(1)
    torch.testing.assert_close(
        via_map, power_sigma1(lambda v: (dense.mT @ (dense @ v.unsqueeze(-1))).squeeze(-1), start)
    )
    assert bool((via_map <= torch.linalg.matrix_norm(dense, ord=2) * (1 + 1e-12)).all())


def test_sigma_ratio_matches_svdvals():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 60, generator=gen, dtype=torch.float64)
    sv = torch.linalg.svdvals(w)
    for k in (1, 5, 10, 38):  # ARPACK
        assert sigma_ratio(w, k) == pytest.approx(float(sv[k - 1] / sv[0]), rel=1e-8)
    for k in (39, 40):  # dense fallback
        assert sigma_ratio(w, k) == pytest.approx(float(sv[k - 1] / sv[0]), rel=1e-12)
    assert sigma_ratio(w, 100) == pytest.approx(float(sv[-1] / sv[0]), rel=1e-12)  # k clipped
    assert sigma_ratio(w.T.float(), 10) == pytest.approx(float(sv[9] / sv[0]), rel=1e-5)
    assert sigma_ratio(torch.zeros(5, 8), 3) == 0.0
    with pytest.raises(ValueError, match="k must"):
        sigma_ratio(w, 0)


# --- the factor F_b ≈ U_k V_kᵀ --------------------------------------------------------------------


def test_ns_factor_approximates_projector(table):
    """A clear gap at σ_k: F_bᵀF_b ≈ V_kV_kᵀ for every example, with the ratio of the first."""
    gen = torch.Generator().manual_seed(3)
    m, n, k = 24, 40, 6
    s = torch.cat([torch.linspace(1.0, 0.85, k), torch.linspace(0.6, 0.01, m - k)]).double()
    ws, vs = [], []
    for scale in (1.0, 7.0, 0.02):  # per-example normalisation: the norms differ widely
        w, _, v = with_singular_values(s * scale, m, n, gen)
        ws.append(w)
        vs.append(v[:, :k])
    w = torch.stack(ws)
    ratio = sigma_ratio(w[0], k)
    assert ratio == pytest.approx(0.85)
    f = ns_factor(w, ratio, table)
    assert f.shape == w.shape and f.dtype == w.dtype
    for b, v in enumerate(vs):
        cov = f[b].T @ f[b]  # (n, n)
        assert float(torch.linalg.matrix_norm(cov - v @ v.T, ord=2)) < 0.02


def test_ns_factor_zero_and_rank_deficient(table):
    gen = torch.Generator().manual_seed(4)
    s = torch.tensor([2.0, 1.9], dtype=torch.float64)
    low_rank, _, v = with_singular_values(s, 8, 10, gen)  # rank 2
    w = torch.stack([low_rank, torch.zeros(8, 10, dtype=torch.float64)])
    f = ns_factor(w, 0.95, table)
    assert bool(torch.isfinite(f).all())
    assert torch.equal(f[1], torch.zeros(8, 10, dtype=torch.float64))
    sv = torch.linalg.svdvals(f[0])
    assert float(sv[2:].max()) < 1e-10  # still rank 2
    torch.testing.assert_close(f[0].T @ f[0], v @ v.T, rtol=0, atol=0.03)
    assert bool(torch.isfinite(ns_factor(torch.zeros(3, 4, 5), 0.0, table)).all())


def test_ns_factor_redoes_underestimated_sigma(table, monkeypatch):
    """A σ̂_1 far below σ_1 pushes singular values past the invariant interval, where the
    t = 0.5 composition blows up; ns_factor then redoes the example with the exact σ_1."""
    gen = torch.Generator().manual_seed(5)
    s = torch.tensor([2.0, 1.8, 0.6, 0.2], dtype=torch.float64)  # σ_1 = 2: not its own square
    w = torch.stack([with_singular_values(s, 6, 9, gen)[0] for _ in range(2)])
    coeffs = coefficients_for(0.55, table)
    reference = newton_schulz(w / 2.0, coeffs, table.iterations)
    assert not bool(torch.isfinite(newton_schulz(w / 1.4, coeffs, table.iterations)).all())
    monkeypatch.setattr(
        ns, "power_iteration_sigma1", lambda w, iters: torch.tensor([1.4, 2.0], dtype=w.dtype)
    )
    torch.testing.assert_close(ns_factor(w, 0.55, table), reference, rtol=0, atol=1e-9)


def test_newton_schulz_on_nonzero_columns_is_the_dense_factor(table):
    """An odd matrix polynomial keeps zero columns zero: applied to the nonzero columns alone it
    gives the dense result's nonzero columns (float64, same normalisation)."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(3, 12, 16, generator=gen, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 8, 9, 13])
    w[:, :, [c for c in range(16) if c not in keep.tolist()]] = 0.0
    w = w / torch.linalg.matrix_norm(w, ord=2)[:, None, None]
    coeffs = coefficients_for(0.3, table)
    dense = newton_schulz(w, coeffs, table.iterations)
    compact = newton_schulz(w[:, :, keep].contiguous(), coeffs, table.iterations)
    torch.testing.assert_close(dense[:, :, keep], compact, rtol=0, atol=1e-12)
    assert float(dense.abs().sum()) == pytest.approx(float(compact.abs().sum()), rel=1e-12)
