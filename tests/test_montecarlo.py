"""Monte-Carlo laws of the estimators (paper §1–§3).

For a Gaussian guess y ~ N(0, C) and d = Σ_j g_j·y_j over all layers j:

    E[ĝ_i] = C_i g_i,    E[ĝ_i^∘2] = (Σ_j g_jᵀ C_j g_j) diag C_i + 2 (C_i g_i)^∘2,

so the mean weight estimate is Σ_b (C_b g_b) x_bᵀ, and weight perturbation is unbiased.

Every test here is probabilistic: it uses fixed seeds, and its tolerance is 5 standard errors
computed from the sample variance of the very draws it averages.  Independent draws come from
one forward pass over the batch repeated R times (each copy gets its own guesses); the loss of
that pass is the mean over R·B examples, so its d_b are rescaled by R.
"""

from __future__ import annotations

import copy

import pytest
import torch

import guessgrad
from guessgrad.metrics import true_gradients

REPS = 2000
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


def mat_vec(c, v):
    return (c @ v.unsqueeze(-1)).squeeze(-1)


def assert_within(samples, expected, *, what):
    """mean over the first axis of ``samples`` is within Z standard errors of ``expected``."""
    n = samples.shape[0]
    mean = samples.mean(0)
    se = samples.std(0) / n**0.5
    excess = (mean - expected).abs() - Z * se
    worst = float(excess.max())
    assert worst <= 1e-12 * (1 + float(expected.abs().max())), f"{what}: {worst}"
    return se


@pytest.fixture
def mc_model(make_mlp):
    return make_mlp(seed=21)


@pytest.fixture
def mc_batch(mc_model, make_batch):
    return make_batch(mc_model, BATCH, seed=22)


def test_mean_estimate_is_c_times_g(forward_case, mc_model, mc_batch):
    """Probabilistic: the mean of ĝ_i = d·y_i over draws converges to C_i g_i at every layer
    (to g_i where C_i g_i = g_i: activation perturbation, k = rank, the output layer)."""
    x, y = mc_batch
    data = draws(forward_case, mc_model, x, y)
    discriminated = False
    for i, (g_hat, c, g) in enumerate(zip(data["g_hat"], data["cov"], data["g"])):
        cg = mat_vec(c, g)
        se = assert_within(g_hat, cg, what=f"layer {i}")
        # power: somewhere the bias (C − I) g exceeds 3·Z standard errors, so a mean that
        # converged to g instead of C g would have failed the check above
        if float(((cg - g).abs() / se.clamp_min(1e-300)).max()) > 3 * Z:
            discriminated = True
    name = forward_case.name
    if name in ("activation-perturbation",) or forward_case.options.get("k") == "rank":
        for c, g in zip(data["cov"], data["g"]):
            torch.testing.assert_close(mat_vec(c, g), g, rtol=0, atol=1e-12)
    if name in ("w-transpose", "w-perp-bottom"):
        assert discriminated  # the test sees these methods' bias


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
    for i, (g_hat, c, g) in enumerate(zip(data["g_hat"], covs, gs)):
        cg = mat_vec(c, g)
        second = total.unsqueeze(1) * torch.diagonal(c, dim1=1, dim2=2) + 2 * cg.square()
        se = assert_within(g_hat.square(), second, what=f"E ĝ² layer {i}")
        assert float((se / second.clamp_min(1e-300))[second > 0].max()) < 0.5  # has power
        mse = second - 2 * g * cg + g.square()
        assert_within((g - g_hat).square(), mse, what=f"E (g − ĝ)² layer {i}")


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
    # E[(∇L·V)² V_j²] = ‖∇L‖² + 2 (∇L)_j²: the closed-form second moment
    second = true.square().sum() + 2 * true.square()
    assert_within(samples.square(), second, what="weight perturbation second moment")


@pytest.mark.parametrize(
    ("name", "options"),
    [("activation-perturbation", {}), ("w-transpose", {}), ("w-perp", {"k": 3})],
)
def test_diagnose_monte_carlo_converges_to_exact(name, options, mc_model, mc_batch):
    """Probabilistic: with many samples, diagnose's MC ``variance`` and ``bias_mc`` approach
    ``variance_exact`` and ``bias`` within 5 standard errors of their error vectors."""
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
