"""The guesses and their covariances: W̃⊥ (top, bottom, rank), W̃P, W̃ᵀ and isotropic.

Deterministic checks compare ``covariance()`` with float64 SVD references; the Monte-Carlo
checks compare sample covariances with ``covariance()`` within 5 standard errors computed from
the Gaussian closed form Var(y_i y_j) = C_ii C_jj + C_ij².
"""

from __future__ import annotations

import copy

import pytest
import torch

from guessgrad.estimators import ForwardGradient
from guessgrad.guesses import (
    IsotropicGuess,
    Site,
    WPerpGuess,
    WPrecondGuess,
    WTransposeGuess,
    wperp,
)
from guessgrad.jacobians import MaskedLinearJacobian
from guessgrad.metrics import subspace_fidelity
from guessgrad.solvers import top_right_singular
from guessgrad.solvers.newton_schulz import (
    coefficients_for,
    load_coefficients,
    newton_schulz,
    ns_factor,
    power_iteration_sigma1,
    sigma_ratio,
)

F64 = torch.float64


def make_site(weight, s, index=0):
    """The site of a hidden layer with pre-activations ``s`` (B, n) under next weight (m, n)."""
    mask = (s > 0).to(s.dtype)
    x = torch.zeros(s.shape[0], 1, dtype=s.dtype)  # unused by the guesses
    return Site(index=index, x=x, s=s, jacobian=MaskedLinearJacobian(weight, mask))


def random_site(m, n, batch, seed, *, dead=(), few=()):
    """Random next weight (m × n) and pre-activations; examples in ``dead`` have every unit
    off, examples in ``few`` have two units on."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=gen, dtype=F64) / n**0.5
    s = torch.randn(batch, n, generator=gen, dtype=F64)
    for b in dead:
        s[b] = -1.0
    for b in few:
        s[b] = -1.0
        s[b, :2] = 1.0
    return make_site(weight, s)


def replicate(site, reps):
    """The same examples ``reps`` times over (batch reps·B): independent guesses per copy."""
    s = site.s.repeat(reps, 1)
    return make_site(site.jacobian.weight, s, site.index)


def projector(rows):
    return rows.mT @ rows


def svd_top_projector(site, k):
    return projector(top_right_singular(site.jacobian.dense(), k))


def row_space_projector(site):
    w = site.jacobian.dense()
    return torch.linalg.pinv(w) @ w


def seeded(seed):
    return torch.Generator().manual_seed(seed)


GUESSES = {
    "isotropic": IsotropicGuess,
    "w-transpose": WTransposeGuess,
    "w-perp-top": lambda: WPerpGuess(3),
    "w-perp-bottom": lambda: WPerpGuess(3, "bottom"),
    "w-perp-rank": lambda: WPerpGuess("rank"),
    "w-perp-rank-subspace": lambda: WPerpGuess("rank", solver="subspace"),
    "w-perp-subspace": lambda: WPerpGuess(3, solver="subspace"),
    "w-perp-subspace-k>m": lambda: WPerpGuess(8, solver="subspace"),
    "w-precond": WPrecondGuess,
    "w-precond-svd": lambda: WPrecondGuess(solver="svd"),
}


# ---------------------------------------------------------------- deterministic covariances


@pytest.mark.parametrize("shape", [(12, 8), (5, 10)])
def test_w_perp_covariance_is_the_svd_projector(shape):
    m, n = shape
    site = random_site(m, n, 5, seed=0, dead=(1,), few=(2,))
    cov = WPerpGuess(3).covariance(site, {})
    ranks = torch.linalg.matrix_rank(site.jacobian.dense())
    full = ranks >= 3
    ref = svd_top_projector(site, 3)
    # where rank ≥ k the top-k subspace is well defined: equal to the SVD reference
    torch.testing.assert_close(cov[full], ref[full], rtol=0, atol=1e-12)
    # everywhere a rank-3 orthogonal projector
    torch.testing.assert_close(cov @ cov, cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.diagonal(cov, dim1=1, dim2=2).sum(1),
        torch.full((5,), 3.0, dtype=F64),
        rtol=0,
        atol=1e-12,
    )


def test_w_perp_bottom_is_orthogonal_to_the_top():
    """Where rank(W̃_b) ≥ k the top-k and bottom-k subspaces are orthogonal.  Example 1 has
    rank 2 < k = 3: its top-k subspace is the row space plus one null-space direction that the
    SVD picks (LAPACK builds differ), so there only the row space is checked: inside the top
    subspace, orthogonal to the bottom one."""
    site = random_site(12, 8, 4, seed=1)
    top = WPerpGuess(3).covariance(site, {})
    bottom = WPerpGuess(3, "bottom").covariance(site, {})
    full = torch.linalg.matrix_rank(site.jacobian.dense()) >= 3
    assert full.tolist() == [True, False, True, True]
    zeros = torch.zeros_like(top)
    torch.testing.assert_close((top @ bottom)[full], zeros[full], rtol=0, atol=1e-12)
    rows = row_space_projector(site)[~full]
    torch.testing.assert_close(top[~full] @ rows, rows, rtol=0, atol=1e-12)
    torch.testing.assert_close(bottom[~full] @ rows, zeros[~full], rtol=0, atol=1e-12)
    torch.testing.assert_close(bottom @ bottom, bottom, rtol=0, atol=1e-12)
    # k = n: top and bottom both give the identity
    eye = torch.eye(8, dtype=F64).expand(4, 8, 8)
    torch.testing.assert_close(
        WPerpGuess(8, "bottom").covariance(site, {}), eye, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("solver", ["svd", "subspace"])
@pytest.mark.parametrize("shape", [(5, 10), (12, 8)])
def test_w_perp_rank_covariance_is_the_row_space_projector(solver, shape):
    m, n = shape
    site = random_site(m, n, 4, seed=2, dead=(0,), few=(1,))
    cov = WPerpGuess("rank", solver=solver).covariance(site, {})
    torch.testing.assert_close(cov, row_space_projector(site), rtol=0, atol=1e-12)
    assert torch.equal(cov[0], torch.zeros_like(cov[0]))


@pytest.mark.parametrize("k", [3, 5, 20])
def test_subspace_solver_covariance_agrees_with_svd_under_a_gap(k):
    """A next-layer weight with a decaying spectrum and all units on: a clear gap after σ_k."""
    gen = torch.Generator().manual_seed(3)
    m, n = 12, 10
    u = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=F64))[0][:, :n]
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]
    weight = (u * 0.5 ** torch.arange(n, dtype=F64)) @ v.T
    site = make_site(weight, torch.ones(3, n, dtype=F64))
    cov = WPerpGuess(k, solver="subspace").covariance(site, {})
    ref = svd_top_projector(site, k)
    assert float(torch.linalg.matrix_norm(cov - ref, ord=2).max()) < 1e-2
    basis, _ = WPerpGuess(k, solver="subspace").basis(site, {})
    assert subspace_fidelity(site.jacobian.dense(), basis, k) > 1 - 1e-6


def test_subspace_solver_fidelity_over_steps():
    """Warm-started over several steps on flat random spectra: fidelity ≥ 0.99 at each."""
    guess = WPerpGuess(4, solver="subspace", depth=4)
    state: dict = {}
    for step in range(3):
        site = random_site(32, 32, 16, seed=10 + step)
        basis, _ = guess.basis(site, state)
        assert subspace_fidelity(site.jacobian.dense(), basis, 4) >= 0.99
        guess.sample(site, state, generator=seeded(step))
        assert state["start"].shape[0] == 4


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_ritz_iters_converge_to_the_top_ritz_vector_on_a_flat_top(seed):
    """k = 1, block 4, σ_j = 0.97^j (λ_2/λ_1 = 0.94): the Krylov space is the same whatever
    ``ritz_iters``, and with enough rounds the guess's direction is its top Ritz vector (the
    Rayleigh quotient reaches the largest eigenvalue of G on the space, computed here by QR
    and ``eigvalsh`` in float64); the default two rounds stop short on so flat a top."""
    gen = torch.Generator().manual_seed(seed)
    m, n = 24, 20
    u = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=F64))[0][:, :n]
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]
    weight = (u * 0.97 ** torch.arange(n, dtype=F64)) @ v.T
    site = make_site(weight, torch.ones(2, n, dtype=F64))  # every unit on: P_b = I
    gram = weight.T @ weight
    start = wperp._initial_start(4, n, F64, torch.device("cpu"))
    krylov = torch.cat([start, start @ gram, start @ gram @ gram]).T  # (n, 12), depth 2
    q = torch.linalg.qr(krylov)[0]
    top = torch.linalg.eigvalsh(q.T @ gram @ q)[-1]

    def shortfall(**options):
        basis, _ = WPerpGuess(1, solver="subspace", block=4, **options).basis(site, {})
        return 1 - ((basis @ gram) * basis).sum(-1).squeeze(-1) / top  # (B,)

    assert float(shortfall(ritz_iters=30).abs().max()) < 1e-8
    assert float(shortfall().min()) > 1e-3


def test_without_warm_start_each_step_is_independent_of_the_earlier_ones():
    """``warm_start=False``: the basis of a batch does not depend on the steps before it (the
    same fixed start every time); with the warm start (the default) it does."""
    sites = [random_site(32, 32, 16, seed=20 + step) for step in range(3)]
    for warm in (False, True):
        guess = WPerpGuess(4, solver="subspace", warm_start=warm)
        state: dict = {}
        for site in sites[:2]:
            guess.sample(site, state, generator=seeded(0))
        after, _ = guess.basis(sites[2], state)
        fresh, _ = guess.basis(sites[2], {})
        assert torch.equal(after, fresh) is not warm
        assert subspace_fidelity(sites[2].jacobian.dense(), after, 4) >= 0.95


def test_subspace_solver_closed_form_for_few_rows():
    """Next layer with m ≤ k rows: the exact row space (unbiased), as the SVD gives."""
    site = random_site(4, 9, 6, seed=4, dead=(2,))
    cov = WPerpGuess(10, solver="subspace").covariance(site, {})
    torch.testing.assert_close(cov, row_space_projector(site), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["svd", "closed-form"])
@pytest.mark.parametrize("shape", [(8, 8), (12, 8)])
def test_w_precond_covariance_is_identity_when_r_equals_n(shape, solver):
    """W̃P: Cov = V_r V_rᵀ = I whenever r = min(m, n) = n, even with inactive units (σ > 0)."""
    m, n = shape
    site = random_site(m, n, 4, seed=5, dead=(0,), few=(1,))
    cov = WPrecondGuess(solver=solver).covariance(site, {})
    torch.testing.assert_close(cov, torch.eye(n, dtype=F64).expand(4, n, n), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["svd", "closed-form"])
def test_w_precond_covariance_is_a_projector_when_m_below_n(solver):
    """m < n: an orthogonal projector that contains the row space of W̃_b and equals it where
    W̃_b has full row rank m; the SVD form keeps rank m (null directions of weight 1) where
    W̃_b is rank deficient."""
    site = random_site(4, 10, 5, seed=6, few=(2,))
    cov = WPrecondGuess(sigma=1e-3, solver=solver).covariance(site, {})
    torch.testing.assert_close(cov @ cov, cov, rtol=0, atol=1e-12)
    rows = row_space_projector(site)
    torch.testing.assert_close(cov @ rows, rows, rtol=0, atol=1e-12)
    full = torch.linalg.matrix_rank(site.jacobian.dense()) == 4
    assert full.sum() >= 2 and not full[2]
    torch.testing.assert_close(cov[full], rows[full], rtol=0, atol=1e-12)
    trace = torch.diagonal(cov, dim1=1, dim2=2).sum(1)
    if solver == "svd":
        torch.testing.assert_close(trace, torch.full((5,), 4.0, dtype=F64), rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(cov, rows, rtol=0, atol=1e-12)


def test_w_transpose_covariance_is_gram():
    site = random_site(6, 9, 4, seed=7, dead=(3,))
    w = site.jacobian.weight
    mask = site.jacobian.mask
    ref = torch.stack([torch.diag(mk) @ w.T @ w @ torch.diag(mk) for mk in mask])
    torch.testing.assert_close(WTransposeGuess().covariance(site, {}), ref, rtol=1e-14, atol=1e-14)


def test_isotropic_covariance_is_identity():
    site = random_site(6, 9, 3, seed=8)
    cov = IsotropicGuess().covariance(site, {})
    assert torch.equal(cov, torch.eye(9, dtype=F64).expand(3, 9, 9))


@pytest.mark.parametrize("name", [name for name in GUESSES if name != "isotropic"])
def test_a_guess_that_needs_the_jacobian_refuses_the_output_layer(name):
    """At the output layer (no next layer, no W̃) a clear ValueError, not an AssertionError
    (or, under ``python -O``, an AttributeError from deep inside)."""
    hidden = random_site(4, 6, 3, seed=1)
    output = Site(index=3, x=hidden.x, s=hidden.s, jacobian=None)
    guess = GUESSES[name]()
    assert guess.needs_jacobian
    for call in (
        lambda: guess.sample(output, {}, generator=seeded(0)),
        lambda: guess.covariance(output, {}),
    ):
        with pytest.raises(ValueError, match="layer 3 is the output layer"):
            call()
    assert IsotropicGuess().sample(output, {}, generator=seeded(0)).shape == (3, 6)
    # and an estimator refuses it as the output layer's guess when it is built, not at the
    # first estimate; as the hidden layers' guess it is taken
    with pytest.raises(ValueError, match="needs an upstream Jacobian, which the output layer"):
        ForwardGradient(IsotropicGuess(), output_guess=guess)
    assert ForwardGradient(guess).output_guess.needs_jacobian is False


# ---------------------------------------------------------------- samples


@pytest.mark.parametrize("name", [name for name in GUESSES if name != "isotropic"])
def test_samples_lie_in_the_range_of_the_covariance(name):
    """Every guess y_b lies in range(C_b): (I − P_b) y_b = 0, P_b the range projector; on a
    tall W̃ (12 × 8) and a wide one (4 × 10, whose rank 4 leaves every covariance a null space
    for the test to look in).  The isotropic guess, C = I, has none."""
    nulls = 0
    for m, n in ((12, 8), (4, 10)):
        site = random_site(m, n, 6, seed=9, dead=(0,), few=(1,))
        guess = GUESSES[name]()
        state: dict = {}
        cov = guess.covariance(site, state)
        y = guess.sample(site, state, generator=seeded(0))
        assert y.shape == (6, n) and torch.isfinite(y).all()
        lam, u = torch.linalg.eigh(cov)
        null = u * (lam <= 1e-10).to(F64).unsqueeze(1)
        nulls += int((lam <= 1e-10).sum())
        leak = (null.mT @ y.unsqueeze(-1)).squeeze(-1)
        assert float(leak.abs().max()) <= 1e-12
    assert nulls >= 6 * (10 - 4)  # the test has power: at least the wide site's null spaces


def test_w_perp_samples_lie_in_the_top_k_svd_subspace():
    """Projected on the complement of the float64 SVD's top-k subspace, the guesses vanish; the
    bottom control's guesses vanish on the top-k subspace instead."""
    site = random_site(12, 8, 5, seed=10)
    site = make_site(site.jacobian.weight, site.s[[0, 1, 2, 4]])  # ≥ 3 active units each
    p_top = svd_top_projector(site, 3)
    eye = torch.eye(8, dtype=F64)
    y = WPerpGuess(3).sample(site, {}, generator=seeded(1))
    off = ((eye - p_top) @ y.unsqueeze(-1)).squeeze(-1)
    assert float(off.abs().max()) <= 1e-12 * float(y.abs().max())
    assert float(y.norm(dim=1).min()) > 0
    yb = WPerpGuess(3, "bottom").sample(site, {}, generator=seeded(1))
    on = (p_top @ yb.unsqueeze(-1)).squeeze(-1)
    assert float(on.abs().max()) <= 1e-12 * float(yb.abs().max())


def test_covariance_reads_but_never_changes_state_or_generator():
    site = random_site(16, 8, 4, seed=11)
    guess = WPerpGuess(3, solver="subspace")
    state: dict = {}
    guess.sample(site, state, generator=seeded(0))
    saved = copy.deepcopy(state)
    gen = seeded(5)
    torch.manual_seed(7)
    cov = guess.covariance(site, state)
    assert state.keys() == saved.keys() and torch.equal(state["start"], saved["start"])
    # no draw from the global generator either (covariance takes none of its own)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(7).get_state())
    # the next sample uses the basis the covariance described
    y = guess.sample(site, state, generator=gen)
    torch.testing.assert_close((cov @ y.unsqueeze(-1)).squeeze(-1), y, rtol=0, atol=1e-9)
    assert not torch.equal(state["start"], saved["start"])  # the warm start moved on


@pytest.mark.parametrize("name", list(GUESSES))
def test_sample_covariance_converges(name):
    """Probabilistic (fixed seed): the sample covariance of 6000 guesses per example is within
    5 standard errors of covariance(), with Var(y_i y_j) = C_ii C_jj + C_ij² (Gaussian y)."""
    reps = 6000
    base = random_site(12, 8, 3, seed=12, few=(1,))
    site = replicate(base, reps)
    guess = GUESSES[name]()
    cov = guess.covariance(base, {})  # (B, n, n)
    y = guess.sample(site, {}, generator=seeded(2)).view(reps, 3, 8)
    sample_cov = torch.einsum("rbi,rbj->bij", y, y) / reps
    diag = torch.diagonal(cov, dim1=1, dim2=2)
    se = ((diag.unsqueeze(2) * diag.unsqueeze(1) + cov.square()) / reps).sqrt()
    assert float(((sample_cov - cov).abs() - 5 * se).max()) <= 1e-12
    # the test has power: the standard errors are small next to C
    assert float(se.max()) < 0.05 * float(diag.max())
    # and the scale: E‖y_b‖² = tr C_b, Var ‖y_b‖² = 2 tr C_b² (Gaussian y), pooled over
    # examples, tells C from 0.93 C and 1.07 C, which the entries alone (5 standard errors of
    # up to 9% on the diagonal) would not
    total = float(diag.sum())
    mean = float(y.square().sum(-1).sum(-1).mean())  # Σ_b ‖y_b‖² per draw, averaged
    se_total = (2 * float(cov.square().sum()) / reps) ** 0.5
    assert abs(mean - total) <= 5 * se_total
    for scale in (0.93, 1.07):
        assert abs(mean - scale * total) > 5 * se_total, scale


def test_exact_top_k_on_active_columns_is_the_dense_svd():
    """The exact solver's top-k SVD of W̃_b's active columns only, put back in place, equals the
    dense SVD's subspace (float64) wherever the top k singular values are nonzero; where an
    example has fewer than k active units, the rows past its rank are orthonormal directions of
    the null space, as the dense SVD's are; an example with no active unit gives no NaN."""
    k = 3
    site = random_site(12, 9, 7, seed=21, dead=(2,), few=(5,))
    jac = site.jacobian
    basis, _ = WPerpGuess(k).basis(site, {})
    assert basis.shape == (7, k, 9) and torch.isfinite(basis).all()
    torch.testing.assert_close(basis @ basis.mT, torch.eye(k, dtype=F64).expand(7, k, k))
    rank = jac.mask.sum(1).long()  # W is generic, so rank(W̃_b) = active units
    full = rank >= k
    assert int(full.sum()) == 5
    reference = svd_top_projector(site, k)
    torch.testing.assert_close(projector(basis)[full], reference[full], rtol=0, atol=1e-12)
    dense = jac.dense()
    for b in torch.nonzero(~full).flatten().tolist():  # rows past the rank: null space
        r = int(rank[b])
        row_space = torch.linalg.pinv(dense[b]) @ dense[b]
        torch.testing.assert_close(projector(basis[b, :r]), row_space, rtol=0, atol=1e-12)
        assert float((dense[b] @ basis[b, r:].mT).abs().max()) <= 1e-12


def test_newton_schulz_ratio_skips_a_first_example_with_no_active_unit():
    """σ_k/σ_1 is the first example's (the paper's code), but an example whose units are all
    off has W̃_b = 0 and no spectrum: the first example after it with one is used instead of
    a ratio of 0, which would pick the coarsest polynomial for the next 50 steps."""
    site = random_site(24, 30, 6, seed=21, dead=(0, 1))
    _, update = WPerpGuess(4, solver="newton-schulz").basis(site, {})
    dense = site.jacobian.dense()
    assert update["sigma_ratio"] > 0
    assert update["sigma_ratio"] == pytest.approx(sigma_ratio(dense[2], 4), rel=1e-12)
    dead = random_site(24, 30, 3, seed=21, dead=(0, 1, 2))  # nothing to measure: 0
    assert WPerpGuess(4, solver="newton-schulz").basis(dead, {})[1]["sigma_ratio"] == 0.0


@pytest.mark.parametrize("group", [64, 2])
def test_newton_schulz_guess_is_the_polynomial_of_each_example(monkeypatch, group):
    """W̃⊥-NS from Gram matrices on active columns, examples grouped by active count: the
    factor is zero on inactive units and equals p^N(W̃_b/σ̂_b) of the dense W̃_b, with σ̂_b the
    dense power iteration and the set of the first example's σ_k/σ_1 (float64), whatever the
    grouping; its samples are F_bᵀ ε_b from the same normal draws."""
    monkeypatch.setattr(wperp, "NS_GROUP", group)
    site = random_site(24, 30, 6, seed=21, dead=(2,), few=(5,))
    jac = site.jacobian
    state: dict = {}
    guess = WPerpGuess(4, solver="newton-schulz")
    factor, update = guess.basis(site, state)
    assert factor.shape == (6, 24, 30)
    assert torch.equal(factor * (1 - jac.mask).unsqueeze(1), torch.zeros_like(factor))
    assert update["sigma_ratio"] == pytest.approx(sigma_ratio(jac.dense()[0], 4), rel=1e-12)
    table = load_coefficients()
    coeffs = coefficients_for(update["sigma_ratio"], table)
    dense = jac.dense()
    sigma = power_iteration_sigma1(dense)
    for b in range(6):
        scale = 1 / sigma[b] if sigma[b] > 0 else 0.0
        ref = newton_schulz(dense[b] * scale, coeffs, table.iterations)
        torch.testing.assert_close(factor[b], ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(
        factor, ns_factor(dense, update["sigma_ratio"], table), rtol=0, atol=1e-9
    )
    y = guess.sample(site, {}, generator=seeded(4))
    eps = torch.randn(6, 1, 24, generator=seeded(4), dtype=F64)
    torch.testing.assert_close(y, (eps @ factor).squeeze(1), rtol=0, atol=1e-12)


def test_warm_start_follows_the_model_to_another_dtype():
    """The Krylov warm start kept in the estimator's state is carried over (converted) when the
    same estimator is used on the model in float64 after float32 steps."""
    import guessgrad

    torch.manual_seed(0)
    model = guessgrad.MLP([10, 16, 16, 4])
    x, y = torch.randn(32, 10), torch.randint(0, 4, (32,))
    est = guessgrad.make_estimator("w-perp", k=4)
    est.estimate(model, x, y, generator=torch.Generator().manual_seed(1))
    starts = [layer["start"] for layer in est.state.values() if "start" in layer]
    assert len(starts) == 1 and starts[0].dtype == torch.float32  # the 4-row layer: closed form
    model64 = copy.deepcopy(model).double()
    carried = {i: layer["start"].double() for i, layer in est.state.items() if "start" in layer}
    fresh = copy.deepcopy(est)
    fresh.state = {}
    est.estimate(model64, x.double(), y, generator=torch.Generator().manual_seed(1))
    fresh.estimate(model64, x.double(), y, generator=torch.Generator().manual_seed(1))
    assert all(layer["start"].dtype == torch.float64 for layer in est.state.values() if layer)
    for i, start in carried.items():  # the step started from the converted block, not afresh
        assert not torch.allclose(est.state[i]["start"], fresh.state[i]["start"])
        assert not torch.allclose(est.state[i]["start"], start)  # and moved it on
    for p in model64.parameters():
        assert p.grad.dtype == torch.float64 and bool(torch.isfinite(p.grad).all())


def test_newton_schulz_ratio_is_refreshed_every_refresh_steps():
    """Paper §2.6: σ_k/σ_1 is measured on the first step and then every ``refresh`` steps; in
    between, the last measured ratio is kept whatever the weights do (each step here brings a
    Jacobian of another spectrum)."""
    refresh, k = 3, 4
    guess, state = WPerpGuess(k, solver="newton-schulz", refresh=refresh), {}
    sites = []
    for seed in range(7):
        site = random_site(24, 30, 4, seed=seed)
        weight = site.jacobian.weight.clone()
        weight[:, : 2 * seed] *= 5.0  # a steeper spectrum at every step
        sites.append(make_site(weight, site.s))
    measured = [sigma_ratio(site.jacobian.dense()[0], k) for site in sites]
    assert len({round(r, 9) for r in measured}) == len(measured)  # each step's ratio differs
    for step, site in enumerate(sites):
        guess.sample(site, state, generator=seeded(step))
        assert state["ns_steps"] == step + 1
        expected = measured[step - step % refresh]  # steps 0, 0, 0, 3, 3, 3, 6
        assert state["sigma_ratio"] == pytest.approx(expected, rel=1e-12), step


def test_w_perp_takes_the_newton_schulz_refresh():
    import guessgrad

    est = guessgrad.WPerp(solver="newton-schulz", refresh=5)
    assert est.guess.refresh == 5 and est.options()["refresh"] == 5
    assert guessgrad.make_estimator("w-perp-ns", refresh=3).guess.refresh == 3
    with pytest.raises(ValueError, match="refresh must be a positive integer"):
        guessgrad.WPerp(solver="newton-schulz", refresh=0)


def test_subspace_sampler_follows_its_covariance_in_float32_with_few_active_units():
    """In float32, an example with few active units has nearly dependent Krylov vectors, and
    rebuilding its Ritz vectors from their coefficients amplified rounding to O(1): the
    sampler's law (rows RᵀR, R = what ``combine`` maps e_j to) was up to 1.5 away from
    ``covariance()`` here.  Such examples now get exact rows, in both."""
    import guessgrad as gg
    from guessgrad.estimators import WPerp
    from guessgrad.solvers.subspace import krylov_ritz

    torch.manual_seed(4)
    model = gg.MLP([40, 32, 32, 32, 10])
    x, y = torch.randn(256, 40), torch.randint(0, 10, (256,))
    est = WPerp(k=10)
    layers = gg.linear_layers(model)
    for step in range(2):  # warm starts as in training
        est.tangent_pass(layers, x, y, generator=torch.Generator().manual_seed(step))
    sites = {}

    def grab(site, guess, state):
        if site.jacobian is not None and site.jacobian.rows > 10:
            sites[site.index] = (site, guess, copy.deepcopy(state))

    est.tangent_pass(layers, x, y, generator=torch.Generator().manual_seed(2), on_site=grab)
    flagged = 0
    for site, guess, state in sites.values():
        ritz = krylov_ritz(site.jacobian, 10, state["start"])
        eye = torch.eye(10).expand(site.batch, 10, 10)
        rows = torch.stack([ritz.combine(eye[:, j].contiguous()) for j in range(10)], 1)
        sampler = (rows.mT @ rows).double()
        cov = guess.covariance(site, state).double()
        assert (sampler - cov).abs().amax() < 1e-2
        if ritz.exact_examples is not None:
            flagged += ritz.exact_examples.numel()
            # the exact rows are the top-10 right singular subspace of W̃_b
            dense = site.jacobian.dense()[ritz.exact_examples].double()
            top = top_right_singular(dense, 10)
            want = top.mT @ top
            assert (cov[ritz.exact_examples] - want).abs().amax() < 1e-4
    assert flagged > 0  # the case the test is about occurs here


def test_newton_schulz_ratio_is_not_carried_to_a_layer_of_another_shape():
    """σ_k/σ_1 is refreshed every ``refresh`` steps; an estimator moved to a model of another
    width measures it again at once instead of using the old model's polynomial."""
    import guessgrad as gg

    def covariances(est, model, x, y):
        covs = []

        def grab(site, guess, state):
            if site.jacobian is not None and site.jacobian.rows > 3:
                covs.append(guess.covariance(site, state))

        est.tangent_pass(gg.linear_layers(model), x, y, on_site=grab)
        return covs

    torch.manual_seed(0)
    a, b = gg.MLP([6, 16, 16, 4]).double(), gg.MLP([6, 24, 24, 4]).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    moved = gg.WPerp(k=3, solver="newton-schulz")
    moved.tangent_pass(gg.linear_layers(a), x, y, generator=torch.Generator().manual_seed(0))
    fresh = gg.WPerp(k=3, solver="newton-schulz")
    for got, want in zip(covariances(moved, b, x, y), covariances(fresh, b, x, y), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_block_k_is_the_default_and_warm_start_takes_numpy_booleans():
    """``block=k`` is the default setting (``block=None``): one record of it in ``options()``,
    so that it names the same run; NumPy's booleans are taken for ``warm_start`` as Python's."""
    import numpy as np

    import guessgrad

    assert WPerpGuess(4, solver="subspace", block=4).block is None
    assert WPerpGuess(4, solver="subspace", block=5).block == 5
    default = guessgrad.make_estimator("w-perp", k=4).options()
    assert guessgrad.make_estimator("w-perp", k=4, block=4).options() == default
    est = guessgrad.make_estimator("w-perp", k=4, warm_start=np.bool_(False))
    assert est.options()["warm_start"] is False
