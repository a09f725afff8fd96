"""Deterministic exactness of the forward-mode pass against reverse-mode autograd.

For every estimator the tangent pass returns d_b = Σ_i g_i^b · v_i^b with g_i^b = ∂(CE_b/B)/∂s_i^b
and v_i^b the tangent injected at layer i (paper §2, "How one step works").  These tests
rebuild d from autograd (reverse mode, and torch.func's forward mode) for the very tangents the
estimator injected, then check the gradient estimate assembled from it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import guessgrad
from guessgrad.estimators import ForwardGradient, tangent_forward
from guessgrad.metrics import true_gradients

SCENARIOS = {
    "float64": dict(dtype=torch.float64, bias=True, batch=5),
    "no-bias": dict(dtype=torch.float64, bias=False, batch=5),
    "batch-of-one": dict(dtype=torch.float64, bias=True, batch=1),
    "inactive-example": dict(dtype=torch.float64, bias=True, batch=4, inactive=2),
    "zero-input": dict(dtype=torch.float64, bias=False, batch=3, zero=1),
    "float32": dict(dtype=torch.float32, bias=True, batch=5),
}


def scenario_batch(make_mlp, make_batch, name):
    sc = SCENARIOS[name]
    model = make_mlp(dtype=sc["dtype"], bias=sc["bias"], seed=3)
    x, y = make_batch(model, sc["batch"], seed=4, inactive=sc.get("inactive"))
    if "zero" in sc:
        x[sc["zero"]] = 0.0  # pre-activations exactly 0: ReLU'(0) = 0 on both sides
    return model, x, y


def tolerances(dtype):
    return dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-6)


def as_float64(model, x):
    return copy.deepcopy(model).double(), x.double()


def reverse_directional(layers, x, y, injected):
    """Σ_i ⟨∂(CE_b/B)/∂s_i^b, v_i^b⟩ per example, by reverse-mode autograd through offsets δ_i
    added to every pre-activation (∂L/∂δ_i^b = ∂(CE_b/B)/∂s_i^b since only example b sees δ^b)."""
    deltas = [torch.zeros_like(v, requires_grad=True) for v in injected]
    with torch.enable_grad():
        h = x
        for i, layer in enumerate(layers):
            bias = None if layer.bias is None else layer.bias.detach()
            s = F.linear(h, layer.weight.detach(), bias) + deltas[i]
            h = F.relu(s) if i < len(layers) - 1 else s
        grads = torch.autograd.grad(F.cross_entropy(h, y), deltas)
    return sum((g * v).sum(1) for g, v in zip(grads, injected))


def jvp_directional(layers, x, y, injected):
    """The same d_b from torch.func.jvp of the per-example losses CE_b / B."""

    def per_example(*deltas):
        h = x
        for i, layer in enumerate(layers):
            s = F.linear(h, layer.weight.detach(), layer.bias) + deltas[i]
            h = F.relu(s) if i < len(layers) - 1 else s
        return F.cross_entropy(h, y, reduction="none") / x.shape[0]

    zeros = tuple(torch.zeros_like(v) for v in injected)
    with torch.no_grad():
        _, d = torch.func.jvp(per_example, zeros, tuple(injected))
    return d


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_tangent_equals_reverse_mode(forward_case, scenario, make_mlp, make_batch):
    model, x, y = scenario_batch(make_mlp, make_batch, scenario)
    est = forward_case.make()
    layers = guessgrad.linear_layers(model)
    result = est.tangent_pass(layers, x, y, generator=seeded(7))
    assert all(torch.isfinite(v).all() for v in result.injected)
    # reference in float64 on the same tangents
    model64, x64 = as_float64(model, x)
    injected64 = [v.double() for v in result.injected]
    d_ref = reverse_directional(guessgrad.linear_layers(model64), x64, y, injected64)
    torch.testing.assert_close(result.d.double(), d_ref, **tolerances(x.dtype))
    # and the same through the library's backprop gradients: d_b = Σ_i g_i^b · v_i^b
    g, _ = true_gradients(guessgrad.linear_layers(model64), x64, y)
    d_lib = sum((gi * vi).sum(1) for gi, vi in zip(g, injected64))
    torch.testing.assert_close(d_lib, d_ref, rtol=1e-10, atol=1e-13)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_tangent_equals_torch_func_jvp(forward_case, model, batch):
    x, y = batch
    layers = guessgrad.linear_layers(model)
    result = forward_case.make().tangent_pass(layers, x, y, generator=seeded(11))
    d_ref = jvp_directional(layers, x, y, result.injected)
    torch.testing.assert_close(result.d, d_ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_estimate_is_d_times_guess(forward_case, scenario, make_mlp, make_batch):
    """est(∂L/∂W_i) = Σ_b d_b v_i^b x_i^bᵀ and est(∂L/∂b_i) = Σ_b d_b v_i^b, with d_b from
    autograd and v the guesses a fresh estimator draws from the same generator state."""
    model, x, y = scenario_batch(make_mlp, make_batch, scenario)
    layers = guessgrad.linear_layers(model)
    loss = forward_case.make().estimate(model, x, y, generator=seeded(5))
    result = forward_case.make().tangent_pass(layers, x, y, generator=seeded(5))

    model64, x64 = as_float64(model, x)
    layers64 = guessgrad.linear_layers(model64)
    injected64 = [v.double() for v in result.injected]
    d = reverse_directional(layers64, x64, y, injected64)
    inputs = [x64] + [F.relu(layers64[0](x64))]
    for layer in layers64[1:-1]:
        inputs.append(F.relu(layer(inputs[-1])))
    tol = tolerances(x.dtype)
    for layer, v, xi in zip(layers, injected64, inputs):
        g_hat = d.unsqueeze(1) * v
        torch.testing.assert_close(layer.weight.grad.double(), g_hat.T @ xi, **tol)
        if layer.bias is not None:
            torch.testing.assert_close(layer.bias.grad.double(), g_hat.sum(0), **tol)
    torch.testing.assert_close(loss.double(), F.cross_entropy(model64(x64), y), **tol)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_weight_perturbation_is_directional_derivative(scenario, make_mlp, make_batch):
    """est = ⟨∇_θ L, V⟩ V with V ~ N(0, I) drawn per layer, weight then bias."""
    model, x, y = scenario_batch(make_mlp, make_batch, scenario)
    params = list(model.parameters())
    guessgrad.make_estimator("weight-perturbation").estimate(model, x, y, generator=seeded(9))

    gen = seeded(9)
    directions = []
    for layer in guessgrad.linear_layers(model):
        directions.append(torch.randn(layer.weight.shape, generator=gen, dtype=x.dtype))
        if layer.bias is not None:
            directions.append(torch.randn(layer.bias.shape, generator=gen, dtype=x.dtype))
    model64, x64 = as_float64(model, x)
    grads = torch.autograd.grad(F.cross_entropy(model64(x64), y), list(model64.parameters()))
    directional = sum((g * v.double()).sum() for g, v in zip(grads, directions))
    assert len(directions) == len(params)
    for p, v in zip(params, directions):
        torch.testing.assert_close(p.grad.double(), directional * v.double(), **tolerances(x.dtype))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_backprop_equals_autograd(scenario, make_mlp, make_batch):
    model, x, y = scenario_batch(make_mlp, make_batch, scenario)
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    loss = guessgrad.make_estimator("backprop").estimate(model, x, y)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(
            p.grad,
            q.grad,
            rtol=1e-12 if x.dtype == torch.float64 else 1e-5,
            atol=0.0 if x.dtype == torch.float64 else 1e-7,
        )
    torch.testing.assert_close(loss, F.cross_entropy(reference(x), y).detach())


def test_tangent_pass_records_the_forward_pass(model, batch):
    """Sites hold x_i, s_i and W̃_b = W_{i+1} diag(1[s_i > 0]); logits and loss are the model's."""
    x, y = batch
    layers = guessgrad.linear_layers(model)
    est = guessgrad.make_estimator("activation-perturbation")
    assert isinstance(est, ForwardGradient)
    result = est.tangent_pass(layers, x, y, generator=seeded(0))
    h = x
    for i, (layer, site) in enumerate(zip(layers, result.sites)):
        s = layer(h)
        assert site.index == i
        torch.testing.assert_close(site.x, h, rtol=0, atol=0)
        torch.testing.assert_close(site.s, s, rtol=0, atol=0)
        assert result.injected[i].shape == s.shape
        if i < len(layers) - 1:
            mask = (s > 0).double()
            dense = layers[i + 1].weight.unsqueeze(0) * mask.unsqueeze(1)
            torch.testing.assert_close(site.jacobian.dense(), dense, rtol=0, atol=0)
            h = F.relu(s)
        else:
            assert site.jacobian is None
    torch.testing.assert_close(result.logits, model(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(result.loss, F.cross_entropy(model(x), y), rtol=1e-14, atol=0)


def test_tangent_is_linear_in_the_injections(model, batch):
    """d is linear in the tangents: d(αu + w) = α d(u) + d(w), and d(0) = 0 exactly."""
    x, y = batch
    layers = guessgrad.linear_layers(model)
    gen = seeded(2)
    u = [torch.randn(x.shape[0], la.out_features, generator=gen, dtype=x.dtype) for la in layers]
    w = [torch.randn(x.shape[0], la.out_features, generator=gen, dtype=x.dtype) for la in layers]

    def run(vs):
        return tangent_forward(layers, x, y, lambda site: vs[site.index]).d

    alpha = -1.7
    combined = run([alpha * a + b for a, b in zip(u, w)])
    torch.testing.assert_close(combined, alpha * run(u) + run(w), rtol=1e-12, atol=1e-15)
    assert torch.equal(
        run([torch.zeros_like(a) for a in u]), torch.zeros(x.shape[0], dtype=x.dtype)
    )


def test_single_layer_model(make_batch):
    """A model without hidden layers (one nn.Linear): only the output guess, still exact."""
    torch.manual_seed(0)
    model = guessgrad.MLP([5, 3]).double()
    x, y = make_batch(model, 4, seed=0)
    layers = guessgrad.linear_layers(model)
    est = guessgrad.make_estimator("w-perp", k=2)
    result = est.tangent_pass(layers, x, y, generator=seeded(0))
    d_ref = reverse_directional(layers, x, y, result.injected)
    torch.testing.assert_close(result.d, d_ref, rtol=1e-10, atol=1e-13)
