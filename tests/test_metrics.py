"""Deterministic checks of the metrics (paper §3) against closed forms and references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import guessgrad
from guessgrad.metrics import overlap, subspace_fidelity, true_gradients
from guessgrad.solvers import top_right_singular

F64 = torch.float64


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def mat_vec(c, v):
    return (c @ v.unsqueeze(-1)).squeeze(-1)


def covariances(est, layers, x, y):
    """C_i per layer as ``est`` would use them on its next step."""
    covs = {}
    saved = copy.deepcopy(est.state)

    def record(site, guess, state):
        covs[site.index] = guess.covariance(site, state)

    with torch.no_grad():
        est.tangent_pass(layers, x, y, generator=seeded(0), on_site=record)
    est.state = saved
    return [covs[i] for i in range(len(layers))]


def w_tilde_ranks(layers, x):
    """rank(W̃_b) per hidden layer, ``(B,)`` each."""
    ranks, h = [], x
    with torch.no_grad():
        for i, layer in enumerate(layers[:-1]):
            s = layer(h)
            dense = layers[i + 1].weight.unsqueeze(0) * (s > 0).to(s.dtype).unsqueeze(1)
            ranks.append(torch.linalg.matrix_rank(dense))
            h = F.relu(s)
    return ranks


def test_true_gradients_equal_autograd(model, batch):
    x, y = batch
    layers = guessgrad.linear_layers(model)
    g, w_grads = true_gradients(layers, x, y)
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    for w_grad, layer in zip(w_grads, guessgrad.linear_layers(reference)):
        torch.testing.assert_close(w_grad, layer.weight.grad, rtol=1e-12, atol=1e-15)
    for b_grad, layer in zip(g, guessgrad.linear_layers(reference)):
        torch.testing.assert_close(b_grad.sum(0), layer.bias.grad, rtol=1e-12, atol=1e-15)
    # the output layer's g is (softmax − onehot) / B
    logits = model(x).detach()
    expected = (logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(F64)) / x.shape[0]
    torch.testing.assert_close(g[-1], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [1, 3])
def test_cov_norm_of_w_perp(k, make_mlp, make_batch):
    """‖C − I‖ = sqrt(d − k)/d exactly where every W̃_b has rank ≥ k (C a rank-k projector;
    the paper's 0.085 at d = 128, k = 10)."""
    model = make_mlp(seed=4)
    x, y = make_batch(model, 6, seed=4)
    layers = guessgrad.linear_layers(model)
    ranks = w_tilde_ranks(layers, x)
    records = guessgrad.diagnose(
        model, x, y, guessgrad.make_estimator("w-perp", k=k), samples=2, generator=seeded(0)
    )
    checked = 0
    for rec, rank in zip(records, ranks):
        d = rec.width
        if bool((rank >= k).all()):
            assert rec.cov_norm == pytest.approx(math.sqrt(d - k) / d, rel=1e-12)
            checked += 1
    assert checked >= 2
    # activation perturbation: C = I, cov. norm 0; W̃P at the tall layer 0: C = I as well
    ap = guessgrad.diagnose(
        model,
        x,
        y,
        guessgrad.make_estimator("activation-perturbation"),
        samples=1,
        generator=seeded(0),
    )
    assert all(rec.cov_norm == 0.0 for rec in ap)
    wp = guessgrad.diagnose(
        model, x, y, guessgrad.make_estimator("w-precond"), samples=1, generator=seeded(0)
    )
    assert wp[0].cov_norm == pytest.approx(0.0, abs=1e-14)


def test_cov_norm_matches_its_definition(model, batch):
    """sqrt(mean_b ‖C_b − I‖_F² / d²), with C_b from the guess (W̃ᵀ: C_b = W̃_bᵀW̃_b)."""
    x, y = batch
    layers = guessgrad.linear_layers(model)
    est = guessgrad.make_estimator("w-transpose")
    records = guessgrad.diagnose(model, x, y, est, samples=1, generator=seeded(0))
    h = x
    for rec, layer, nxt in zip(records, layers[:-1], layers[1:]):
        s = layer(h).detach()
        wt = nxt.weight.detach().unsqueeze(0) * (s > 0).to(F64).unsqueeze(1)
        c = wt.mT @ wt
        eye = torch.eye(s.shape[1], dtype=F64)
        expected = math.sqrt(float((c - eye).square().sum((1, 2)).mean()) / s.shape[1] ** 2)
        assert rec.cov_norm == pytest.approx(expected, rel=1e-12)
        h = F.relu(s)


def test_bias_and_variance_exact_match_their_formulas(forward_case, model, batch):
    """bias = ‖mean_b (C_b − I) g_b‖ and variance_exact = ‖mean_b E(g_b − ĝ_b)^∘2 − bias^∘2‖
    with E(g − ĝ)^∘2 = (Σ_j g_jᵀC_jg_j) diag C + 2 (Cg)^∘2 − 2 g∘Cg + g^∘2.  This pins
    diagnose to the formula, written out again here from the same covariances; that the
    formula is the law of the draws is test_montecarlo's ``test_second_moment_law``."""
    x, y = batch
    layers = guessgrad.linear_layers(model)
    est = forward_case.make()
    covs = covariances(est, layers, x, y)
    g, _ = true_gradients(layers, x, y)
    records = guessgrad.diagnose(model, x, y, est, samples=1, generator=seeded(0))
    total = sum((mat_vec(c, gi) * gi).sum(1) for c, gi in zip(covs, g))
    for rec, c, gi in zip(records, covs, g):
        cg = mat_vec(c, gi)
        bias_vec = (cg - gi).mean(0)
        assert rec.bias == pytest.approx(float(bias_vec.norm()), rel=1e-10, abs=1e-17)
        mse = total.unsqueeze(1) * torch.diagonal(c, dim1=1, dim2=2) + 2 * cg.square()
        mse = mse - 2 * gi * cg + gi.square()
        expected = float((mse.mean(0) - bias_vec.square()).norm())
        assert rec.variance_exact == pytest.approx(expected, rel=1e-10)


def test_unbiased_methods_have_zero_bias(model, batch):
    x, y = batch
    for name, options in [("activation-perturbation", {}), ("w-perp", {"k": "rank"})]:
        records = guessgrad.diagnose(
            model, x, y, guessgrad.make_estimator(name, **options), samples=1, generator=seeded(0)
        )
        for rec in records:
            assert rec.bias == pytest.approx(0.0, abs=1e-15)
    w_t = guessgrad.diagnose(
        model, x, y, guessgrad.make_estimator("w-transpose"), samples=1, generator=seeded(0)
    )
    assert all(rec.bias > 1e-4 for rec in w_t)


@pytest.mark.parametrize("inactive", [None, 1])
def test_overlap(model, make_batch, inactive):
    """1 when k ≥ rank(W̃_b) (the gradient lies in the row space); otherwise the mean of
    ‖V_kᵀ g_b‖²/‖g_b‖² from the float64 SVD, over examples with g_b ≠ 0 (with ``inactive``,
    example 1 has none at the first hidden layer: it is left out of that mean, not counted
    as 0 or NaN)."""
    x, y = make_batch(model, 5, seed=1, inactive=inactive)
    layers = guessgrad.linear_layers(model)
    est = guessgrad.make_estimator("w-perp", k=12)
    for rec in guessgrad.diagnose(model, x, y, est, samples=1, generator=seeded(0)):
        assert rec.k == 12
        assert rec.overlap == pytest.approx(1.0, abs=1e-12)
    g, _ = true_gradients(layers, x, y)
    records = guessgrad.diagnose(
        model, x, y, guessgrad.make_estimator("w-perp", k=2), samples=1, generator=seeded(0)
    )
    h = x
    for i, (rec, layer, nxt, gi) in enumerate(zip(records, layers[:-1], layers[1:], g)):
        s = layer(h).detach()
        wt = nxt.weight.detach().unsqueeze(0) * (s > 0).to(F64).unsqueeze(1)
        v = torch.linalg.svd(wt, full_matrices=False)[2][:, :2]
        alive = gi.square().sum(1) > 0
        assert bool(alive.all()) == (inactive is None or i > 0)  # the case is reached
        captured = (v @ gi.unsqueeze(-1)).squeeze(-1).square().sum(1)
        ratio = captured[alive] / gi[alive].square().sum(1)
        assert rec.overlap == pytest.approx(float(ratio.mean()), rel=1e-10)
        assert 0 < rec.overlap < 1
        h = F.relu(s)
    if inactive is not None:
        return
    # the estimator's k is the default; otherwise 10, or the k given
    ap = guessgrad.diagnose(
        model,
        x,
        y,
        guessgrad.make_estimator("activation-perturbation"),
        samples=1,
        generator=seeded(0),
    )
    assert all(rec.k == 10 for rec in ap)
    given = guessgrad.diagnose(
        model, x, y, guessgrad.make_estimator("w-transpose"), samples=1, k=1, generator=seeded(0)
    )
    assert all(rec.k == 1 for rec in given)


def test_overlap_function_edge_cases():
    gen = seeded(0)
    w = torch.randn(3, 4, 6, generator=gen, dtype=F64)
    g = torch.zeros(3, 6, dtype=F64)
    assert math.isnan(overlap(w, g, 2))  # no example with a gradient
    g = (w.mT @ torch.randn(3, 4, 1, generator=gen, dtype=F64)).squeeze(-1)  # in the row space
    assert overlap(w, g, 4) == pytest.approx(1.0, abs=1e-12)


def test_subspace_fidelity():
    gen = seeded(1)
    w = torch.randn(4, 7, 9, generator=gen, dtype=F64)
    assert subspace_fidelity(w, top_right_singular(w, 3), 3) == pytest.approx(1.0, abs=1e-12)
    q = torch.linalg.qr(torch.randn(4, 9, 3, generator=gen, dtype=F64))[0].mT  # (B, 3, n)
    captured = (w @ q.mT).square().sum((1, 2))
    top = torch.linalg.svdvals(w)[:, :3].square().sum(1)
    expected = float((captured / top).mean())
    assert subspace_fidelity(w, q, 3) == pytest.approx(expected, rel=1e-12)
    assert expected < 1


def test_diagnose_leaves_state_and_grads_alone(estimator_case, model, batch):
    x, y = batch
    est = estimator_case.make()
    est.estimate(model, x, y, generator=seeded(0))  # warm state, if any
    state = copy.deepcopy(est.state)
    grads = [p.grad.clone() for p in model.parameters()]
    guessgrad.diagnose(model, x, y, est, samples=3, generator=seeded(1))
    assert est.state.keys() == state.keys()
    for key in state:
        assert est.state[key].keys() == state[key].keys()
        for name, value in state[key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(est.state[key][name], value)
            else:
                assert est.state[key][name] == value
    for p, grad in zip(model.parameters(), grads):
        assert torch.equal(p.grad, grad)


def test_diagnose_cosine(model, batch):
    """Backprop's cosine is 1; a forward-gradient's cosine is cos(Σ_b ĝ_b x_bᵀ, ∂L/∂W) of the
    draw from the same generator state; estimators without a covariance report None."""
    x, y = batch
    layers = guessgrad.linear_layers(model)
    for rec in guessgrad.diagnose(model, x, y, guessgrad.make_estimator("backprop"), samples=2):
        assert rec.cosine == pytest.approx(1.0, abs=1e-12)
        assert rec.bias is None and rec.variance is None and rec.cov_norm is None
        assert rec.overlap is None and rec.variance_exact is None and rec.bias_mc is None
    wp = guessgrad.diagnose(
        model, x, y, guessgrad.make_estimator("weight-perturbation"), samples=2, generator=seeded(0)
    )
    _, w_true = true_gradients(layers, x, y)
    # weight perturbation: the mean cosine of the same two draws, made again on a copy
    again, gen, est = (
        copy.deepcopy(model),
        seeded(0),
        guessgrad.make_estimator("weight-perturbation"),
    )
    cosines = torch.zeros(len(wp), dtype=F64)
    for _ in range(2):
        est.estimate(again, x, y, generator=gen)
        for i, layer in enumerate(guessgrad.linear_layers(again)[: len(wp)]):
            cosines[i] += F.cosine_similarity(
                layer.weight.grad.flatten(), w_true[i].flatten(), dim=0
            )
    for rec, expected in zip(wp, cosines / 2):
        assert rec.cosine == pytest.approx(float(expected), rel=1e-10) and rec.bias is None

    # a forward gradient: the mean cosine of three draws, made again from the same generator
    est = guessgrad.make_estimator("w-transpose")
    records = guessgrad.diagnose(model, x, y, est, samples=3, generator=seeded(5))
    gen, expected = seeded(5), torch.zeros(len(records), dtype=F64)
    with torch.no_grad():
        for _ in range(3):
            tp = guessgrad.make_estimator("w-transpose").tangent_pass(layers, x, y, generator=gen)
            for i, (site, v, wt) in enumerate(zip(tp.sites, tp.injected, w_true[: len(records)])):
                w_hat = (tp.d.unsqueeze(1) * v).T @ site.x
                expected[i] += F.cosine_similarity(w_hat.flatten(), wt.flatten(), dim=0) / 3
    for rec, cosine in zip(records, expected):
        assert rec.cosine == pytest.approx(float(cosine), rel=1e-10)


def test_diagnose_records(model, batch):
    x, y = batch
    records = guessgrad.diagnose(
        model, x, y, guessgrad.make_estimator("w-perp", k=3), samples=2, generator=seeded(0)
    )
    assert [r.layer for r in records] == [0, 1, 2]
    assert [r.width for r in records] == [8, 12, 6]
    d = records[0].as_dict()
    assert set(d) == {
        "layer",
        "width",
        "samples",
        "bias",
        "bias_mc",
        "variance",
        "variance_exact",
        "cov_norm",
        "overlap",
        "k",
        "cosine",
    }
    assert d["samples"] == 2 and d["k"] == 3


@pytest.mark.parametrize("samples", [0, -1, 2.5, "3"])
def test_diagnose_rejects_bad_samples(samples, model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="samples="):
        guessgrad.diagnose(model, x, y, guessgrad.make_estimator("backprop"), samples=samples)


def test_diagnose_rejects_bad_batches(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="label 7 out of range"):
        guessgrad.diagnose(model, x, y.clone().fill_(7), guessgrad.make_estimator("backprop"))
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        guessgrad.diagnose(model, x.float(), y, guessgrad.make_estimator("backprop"))


@pytest.mark.parametrize("k", [0, -1, 2.5, "rank", True])
def test_diagnose_rejects_a_bad_k(k, model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="k must be a positive integer"):
        guessgrad.diagnose(model, x, y, guessgrad.make_estimator("w-transpose"), k=k)


def test_diagnose_of_a_frozen_layer_reads_no_stale_gradient(model, batch):
    """The cosine of an estimator without a covariance comes from its estimate, not from
    ``p.grad``, which a frozen layer keeps from earlier (it read -0.2 for backprop, or raised
    where there was none): NaN where the estimator estimates nothing (backprop, weight
    perturbation)."""
    x, y = batch
    m = copy.deepcopy(model)
    first = guessgrad.linear_layers(m)[0]
    first.requires_grad_(False)
    wp_cosines = []
    for stale in (None, torch.ones_like(first.weight)):
        first.weight.grad = stale
        cos = [r.cosine for r in guessgrad.diagnose(m, x, y, guessgrad.Backprop(), samples=1)]
        assert math.isnan(cos[0]) and cos[1:] == pytest.approx([1.0] * (len(cos) - 1))
        assert first.weight.grad is stale
        wp = guessgrad.make_estimator("weight-perturbation")
        wp_cosines.append(guessgrad.diagnose(m, x, y, wp, generator=seeded(3))[0].cosine)
    assert all(math.isnan(c) for c in wp_cosines)  # no estimate, whatever p.grad held


def test_diagnose_scores_a_frozen_layer_alike_for_every_estimator(model, batch):
    """A frozen layer is not estimated: NaN cosine for every estimator (a forward-gradient
    estimator scored it as an estimate of 0: cosine 0 and a bias of ‖g‖), no statistics, and
    the overlap, a property of W̃ and g, as before."""
    x, y = batch
    m = copy.deepcopy(model)
    guessgrad.linear_layers(m)[0].requires_grad_(False)
    free = guessgrad.diagnose(model, x, y, "w-transpose", samples=2, generator=seeded(0))
    for name in ("w-transpose", "activation-perturbation", "backprop"):
        first = guessgrad.diagnose(m, x, y, name, samples=2, generator=seeded(0))[0]
        assert math.isnan(first.cosine)
        stats = (first.bias, first.bias_mc, first.variance, first.variance_exact, first.cov_norm)
        assert stats == (None,) * 5
        if name != "backprop":
            assert first.overlap == pytest.approx(free[0].overlap, rel=1e-12)


def test_diagnose_takes_a_registry_name_and_refuses_other_things(model, batch):
    import numpy as np

    x, y = batch
    by_name = guessgrad.diagnose(
        model, x, y, "w-transpose", samples=np.int64(2), generator=seeded(1)
    )
    built = guessgrad.make_estimator("w-transpose")
    direct = guessgrad.diagnose(model, x, y, built, samples=2, generator=seeded(1))
    assert [r.as_dict() for r in by_name] == [r.as_dict() for r in direct]
    for bad in (guessgrad.WTranspose, None, 3):
        with pytest.raises(TypeError, match="est must be an estimator"):
            guessgrad.diagnose(model, x, y, bad)
    with pytest.raises(ValueError, match="unknown estimator 'w-perpp'"):
        guessgrad.diagnose(model, x, y, "w-perpp")


def test_true_gradients_take_any_integer_labels(model, batch):
    x, y = batch
    layers = guessgrad.linear_layers(model)
    for got, want in zip(true_gradients(layers, x, y.int())[1], true_gradients(layers, x, y)[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_diagnose_refuses_inference_mode(model, batch):
    x, y = batch
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.inference_mode"):
        guessgrad.diagnose(model, x, y, guessgrad.make_estimator("w-transpose"))


def test_diagnose_of_a_frozen_layer_drops_its_cross_layer_noise(model, batch):
    """A frozen layer gets no guess (C = 0): the next layer's bias is unchanged, its exact
    variance smaller (no cross-layer term from the frozen layer), and the Monte-Carlo
    variance agrees with the closed form as before."""
    x, y = batch
    est = guessgrad.make_estimator("w-transpose")
    free = guessgrad.diagnose(model, x, y, est, samples=2000, generator=seeded(0))
    m = copy.deepcopy(model)
    guessgrad.linear_layers(m)[0].requires_grad_(False)
    frozen = guessgrad.diagnose(m, x, y, est, samples=2000, generator=seeded(0))
    assert frozen[1].bias == pytest.approx(free[1].bias, rel=1e-12)
    assert frozen[1].variance_exact < free[1].variance_exact
    for record in (free[1], frozen[1]):
        assert record.variance == pytest.approx(record.variance_exact, rel=0.1)
