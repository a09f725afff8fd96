"""Monte-Carlo laws of the estimators (paper §1–§3).

For a Gaussian guess y ~ N(0, C) and d = Σ_j g_j·y_j over all layers j:

    E[ĝ_i] = C_i g_i,    E[ĝ_i^∘2] = (Σ_j g_jᵀ C_j g_j) diag C_i + 2 (C_i g_i)^∘2,

so the mean weight estimate is Σ_b (C_b g_b) x_bᵀ, and weight perturbation is unbiased.

Every test here is probabilistic: it uses fixed seeds, and its tolerance is 5 standard errors
computed from the sample variance of the very draws it averages.  Independent draws come from
one forward pass over the batch repeated R times (each copy gets its own guesses); the loss of
that pass is the mean over R·B examples, so its d_b are rescaled by R.  Each test also shows
its power: the same draws reject the nearby wrong laws it is meant to tell apart (a mean of g
instead of C g, a scale off by 15%, another coefficient of the fourth-moment term).
"""

from __future__ import annotations

import copy

import pytest
import torch

import guessgrad
from guessgrad.metrics import true_gradients

REPS = 8000
BATCH = 3
Z = 5.0


def seeded(seed):
    return torch.Generator().manual_seed(seed)


_DRAWS: dict[str, dict] = {}


class Case:
    """A registered name with options, shaped like the ``forward_case`` fixture's values."""

    def __init__(self, name, options):
        self.name, self.options = name, dict(options)
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        self.id = f"{name}[{opts}]" if opts else name

    def make(self):
        return guessgrad.make_estimator(self.name, **self.options)


def draws(case, model, x, y):
    """ĝ_i for REPS independent draws per example, ``(R, B, d_{i+1})`` per layer, the guess
    covariances C_i ``(B, d, d)`` and the true g_i, cached per estimator case (the model and
    batch of this module are fixed by their seeds)."""
    if case.id in _DRAWS:
        return _DRAWS[case.id]
    layers = guessgrad.linear_layers(model)
    covs = {}

    def record(site, guess, state):
        covs[site.index] = guess.covariance(site, state)

    xr, yr = x.repeat(REPS, 1), y.repeat(REPS)
    with torch.no_grad():
        case.make().tangent_pass(layers, x, y, generator=seeded(0), on_site=record)
        result = case.make().tangent_pass(layers, xr, yr, generator=seeded(1))
    g_hat = [(REPS * result.d.unsqueeze(1) * v).view(REPS, x.shape[0], -1) for v in result.injected]
    g, _ = true_gradients(layers, x, y)
    out = {"g_hat": g_hat, "cov": [covs[i] for i in range(len(layers))], "g": g}
    _DRAWS[case.id] = out
    return out


def draws_alone(case, model, x, y, i):
    """ĝ_i for REPS draws per example with every other layer frozen, ``(R, B, d_{i+1})``: the
    frozen layers get no guess, so d_b = g_i·y_i carries no cross-layer noise and the mean is
    resolved at each layer to a few percent."""
    alone = copy.deepcopy(model)
    layers = guessgrad.linear_layers(alone)
    for j, layer in enumerate(layers):
        layer.requires_grad_(j == i)
    with torch.no_grad():
        result = case.make().tangent_pass(
            layers, x.repeat(REPS, 1), y.repeat(REPS), generator=seeded(2)
        )
    return (REPS * result.d.unsqueeze(1) * result.injected[i]).view(REPS, x.shape[0], -1)


def mat_vec(c, v):
    return (c @ v.unsqueeze(-1)).squeeze(-1)


def _excess(samples, expected):
    """The largest amount by which the mean over the first axis of ``samples`` misses
    ``expected`` by more than Z standard errors (≤ 0: within), the allowance for rounding,
    and the standard errors."""
    n = samples.shape[0]
    se = samples.std(0) / n**0.5
    worst = float(((samples.mean(0) - expected).abs() - Z * se).max())
    return worst, 1e-12 * (1 + float(expected.abs().max())), se


def assert_within(samples, expected, *, what):
    """mean over the first axis of ``samples`` is within Z standard errors of ``expected``."""
    worst, allowed, se = _excess(samples, expected)
    assert worst <= allowed, f"{what}: {worst}"
    return se


def rejects(pairs):
    """Whether the check of :func:`assert_within` fails for at least one ``(samples,
    expected)`` pair: the draws tell ``expected`` apart from the truth."""
    return any(worst > allowed for worst, allowed, _ in (_excess(s, e) for s, e in pairs))


@pytest.fixture
def mc_model(make_mlp):
    return make_mlp(seed=21)


@pytest.fixture
def mc_batch(mc_model, make_batch):
    return make_batch(mc_model, BATCH, seed=22)


def test_mean_estimate_is_c_times_g(forward_case, mc_model, mc_batch):
    """Probabilistic: the mean of ĝ_i = d·y_i over draws converges to C_i g_i at every layer
    (to g_i where C_i g_i = g_i: activation perturbation, k = rank, the output layer), and the
    same draws reject C_i g_i scaled by 0.85 or 1.15 and, for the biased methods, g_i itself.
    With every layer guessing, the cross-layer noise leaves the hidden layers' means too loose
    to tell a 15% error there; so each layer is also drawn alone (the others frozen), where
    the mean must hold and the scaled laws must be rejected at that very layer."""
    x, y = mc_batch
    data = draws(forward_case, mc_model, x, y)
    layers = list(zip(data["g_hat"], data["cov"], data["g"]))
    for i, (g_hat, c, g) in enumerate(layers):
        assert_within(g_hat, mat_vec(c, g), what=f"layer {i}")
    for scale in (0.85, 1.15):
        assert rejects((g_hat, scale * mat_vec(c, g)) for g_hat, c, g in layers), scale
    scaled = []
    for i, (_, c, g) in enumerate(layers):
        alone = draws_alone(forward_case, mc_model, x, y, i)
        assert_within(alone, mat_vec(c, g), what=f"layer {i} alone")
        if float(mat_vec(c, g).norm()) <= 1e-6 * float(g.norm()):
            # C_i g_i ≈ 0: no scale to tell (W̃⊥-bottom at every hidden layer here, where the
            # gradient has no component in the bottom subspace)
            continue
        for scale in (0.85, 1.15):
            assert rejects([(alone, scale * mat_vec(c, g))]), (i, scale)
        scaled.append(i)
    hidden = [i for i in scaled if i < len(layers) - 1]
    assert hidden or forward_case.name == "w-perp-bottom", "no hidden layer's scale was told"
    name, k = forward_case.name, forward_case.options.get("k")
    if name == "activation-perturbation" or k == "rank":
        for c, g in zip(data["cov"], data["g"]):
            torch.testing.assert_close(mat_vec(c, g), g, rtol=0, atol=1e-12)
    if name in ("w-transpose", "w-perp-bottom") or (name == "w-perp" and k == 3):
        # the test sees these methods' bias: a mean of g would have failed
        assert rejects((g_hat, g) for g_hat, _, g in layers)


def test_unbiased_where_the_paper_says(mc_model, mc_batch):
    """C g = g exactly: activation perturbation everywhere, W̃P where W̃ is tall or square
    (layer 0 here: 12 × 8), W̃⊥ with k = rank, and W̃⊥ (fast solver) with k ≥ rows of W̃."""
    x, y = mc_batch
    layers = guessgrad.linear_layers(mc_model)
    g, _ = true_gradients(layers, x, y)
    for name, options, which in [
        ("activation-perturbation", {}, [0, 1, 2, 3]),
        ("w-precond", {}, [0, 3]),
        ("w-perp", {"k": "rank"}, [0, 1, 2, 3]),
        ("w-perp", {"k": 6, "solver": "subspace"}, [1, 2, 3]),
    ]:
        covs = {}

        def record(site, guess, state, covs=covs):
            covs[site.index] = guess.covariance(site, state)

        est = guessgrad.make_estimator(name, **options)
        est.tangent_pass(layers, x, y, generator=seeded(0), on_site=record)
        for i in which:
            torch.testing.assert_close(mat_vec(covs[i], g[i]), g[i], rtol=0, atol=1e-12)


def test_mean_weight_estimate(forward_case, mc_model, mc_batch):
    """Probabilistic: the mean weight estimate converges to E_i = Σ_b (C_b g_b) x_bᵀ, and the
    estimator's own p.grad on the repeated batch is exactly that mean."""
    x, y = mc_batch
    data = draws(forward_case, mc_model, x, y)
    layers = guessgrad.linear_layers(mc_model)
    inputs = [x]
    for layer in layers[:-1]:
        inputs.append(torch.relu(layer(inputs[-1])).detach())
    model = copy.deepcopy(mc_model)
    forward_case.make().estimate(model, x.repeat(REPS, 1), y.repeat(REPS), generator=seeded(1))
    for i, (g_hat, c, g, xi) in enumerate(zip(data["g_hat"], data["cov"], data["g"], inputs)):
        w_hat = torch.einsum("rbi,bj->rij", g_hat, xi)  # (R, d_{i+1}, d_i)
        expected = mat_vec(c, g).T @ xi
        assert_within(w_hat, expected, what=f"weight {i}")
        assert_within(g_hat.sum(1), mat_vec(c, g).sum(0), what=f"bias {i}")
        layer = guessgrad.linear_layers(model)[i]
        torch.testing.assert_close(layer.weight.grad, w_hat.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, g_hat.sum(1).mean(0), rtol=1e-9, atol=1e-12)


def test_second_moment_law(forward_case, mc_model, mc_batch):
    """Probabilistic: E[ĝ_i^∘2] = (Σ_j g_jᵀC_jg_j) diag C_i + 2 (C_i g_i)^∘2 (cross-layer noise
    included), and E[(g − ĝ)^∘2] = that − 2 g∘(C g) + g^∘2, the law of ``variance_exact``."""
    x, y = mc_batch
    data = draws(forward_case, mc_model, x, y)
    covs, gs = data["cov"], data["g"]
    total = sum((mat_vec(c, g) * g).sum(1) for c, g in zip(covs, gs))  # (B,)

    def law(coefficient=2.0, scale=1.0):
        # (Σ_j g_jᵀC_jg_j) diag C_i + coefficient·(C_i g_i)^∘2 per layer, times scale
        return [
            scale
            * (
                total.unsqueeze(1) * torch.diagonal(c, dim1=1, dim2=2)
                + coefficient * mat_vec(c, g).square()
            )
            for c, g in zip(covs, gs)
        ]

    squares = [g_hat.square() for g_hat in data["g_hat"]]
    for i, (sq, second, g_hat, c, g) in enumerate(zip(squares, law(), data["g_hat"], covs, gs)):
        assert_within(sq, second, what=f"E ĝ² layer {i}")
        mse = second - 2 * g * mat_vec(c, g) + g.square()
        assert_within((g - g_hat).square(), mse, what=f"E (g − ĝ)² layer {i}")
    # power: the draws tell the Gaussian fourth moment's coefficient 2 from 1 and 3, and the
    # law from itself 10% larger
    for wrong in (law(coefficient=1.0), law(coefficient=3.0), law(scale=1.1)):
        assert rejects(zip(squares, wrong))


def test_weight_perturbation_is_unbiased(mc_model, mc_batch):
    """Probabilistic: the mean of 1500 weight-perturbation estimates converges to ∇_θ L."""
    x, y = mc_batch
    model = copy.deepcopy(mc_model)
    est = guessgrad.make_estimator("weight-perturbation")
    gen = seeded(3)
    samples = []
    for _ in range(1500):
        est.estimate(model, x, y, generator=gen)
        samples.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    samples = torch.stack(samples)  # (N, #params)
    reference = copy.deepcopy(mc_model)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    true = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert_within(samples, true, what="weight perturbation")
    assert rejects([(samples, 0.5 * true)]) and rejects([(samples, 2 * true)])  # power
    # E[(∇L·V)² V_j²] = ‖∇L‖² + 2 (∇L)_j²: the closed-form second moment.  With 302 weights
    # the 2 (∇L)_j² term is below what 1500 draws resolve; they do pin the law's scale
    second = true.square().sum() + 2 * true.square()
    assert_within(samples.square(), second, what="weight perturbation second moment")
    assert rejects([(samples.square(), 0.67 * second)])
    assert rejects([(samples.square(), 1.25 * second)])


@pytest.mark.parametrize(
    ("name", "options"),
    [("activation-perturbation", {}), ("w-transpose", {}), ("w-perp", {"k": 3})],
)
def test_diagnose_monte_carlo_converges_to_exact(name, options, mc_model, mc_batch):
    """Probabilistic: with many samples, diagnose's MC ``variance`` and ``bias_mc`` approach
    ``variance_exact`` and ``bias`` within 5 standard errors of their error vectors.  An end-to-end
    check with a coarse tolerance (a third or more of the variance, by the norms diagnose
    reports; the bias half has little power, its tolerance is larger than most layers' bias, and
    is kept as a smoke check); the MC statistics are pinned exactly by the next test, the law
    per coordinate by ``test_second_moment_law``, the exact bias by ``test_metrics``."""
    x, y = mc_batch
    samples = 600
    est = guessgrad.make_estimator(name, **options)
    records = guessgrad.diagnose(mc_model, x, y, est, samples=samples, generator=seeded(4))
    # standard errors of the per-coordinate means diagnose forms, from independent draws
    data = draws(Case(name, options), mc_model, x, y)
    for rec, g_hat, g in zip(records, data["g_hat"], data["g"]):
        b = g.shape[0]
        var_g = g_hat.var(0).sum(0) / b**2  # (n,) variance of (1/B) Σ_b ĝ_b per draw
        var_sq = (g - g_hat).square().var(0).sum(0) / b**2
        tol_bias = Z * float((var_g / samples).sum().sqrt())
        tol_var = Z * float((var_sq / samples).sum().sqrt())
        assert abs(rec.bias_mc - rec.bias) <= tol_bias + 1e-15
        assert abs(rec.variance - rec.variance_exact) <= tol_var + 1e-15
        assert tol_var < 0.5 * rec.variance_exact  # the comparison has power


@pytest.mark.parametrize(
    ("name", "options"),
    [("activation-perturbation", {}), ("w-transpose", {}), ("w-perp", {"k": 3})],
)
def test_diagnose_statistics_are_those_of_its_own_draws(name, options, mc_model, mc_batch):
    """diagnose's ``bias`` is Eq. 17 from the guess covariance, and its ``bias_mc`` and
    ``variance`` are the Monte-Carlo Eq. 17 and Eq. 18 of its draws: the same draws, made again
    here from the same generator (every draw from a fresh estimator state, as diagnose does),
    give the same numbers, computed from the stacked draws."""
    x, y = mc_batch
    samples = 40
    records = guessgrad.diagnose(
        mc_model,
        x,
        y,
        guessgrad.make_estimator(name, **options),
        samples=samples,
        generator=seeded(5),
    )
    layers = guessgrad.linear_layers(mc_model)
    g, _ = true_gradients(layers, x, y)
    gen, covs, g_hats = seeded(5), {}, []

    def record(site, guess, state):
        if site.index not in covs:
            covs[site.index] = guess.covariance(site, state)

    with torch.no_grad():
        for _ in range(samples):
            tp = guessgrad.make_estimator(name, **options).tangent_pass(
                layers, x, y, generator=gen, on_site=record
            )
            g_hats.append([tp.d.unsqueeze(1) * v for v in tp.injected])
    assert [rec.layer for rec in records] == list(range(len(layers) - 1))
    for rec in records:
        i = rec.layer
        g_hat = torch.stack([draw[i] for draw in g_hats])  # (S, B, n)
        bias = (mat_vec(covs[i], g[i]) - g[i]).mean(0)  # Eq. 17: mean over the batch
        mc_bias = (g_hat - g[i]).mean((0, 1))
        mse = (g_hat - g[i]).square().mean((0, 1))  # Eq. 18 before the bias is taken out
        assert rec.bias == pytest.approx(float(bias.norm()), rel=1e-9)
        assert rec.bias_mc == pytest.approx(float(mc_bias.norm()), rel=1e-9)
        assert rec.variance == pytest.approx(float((mse - bias.square()).norm()), rel=1e-9)
        assert rec.bias_mc != pytest.approx(rec.bias, rel=1e-3)  # Monte Carlo, not exact
