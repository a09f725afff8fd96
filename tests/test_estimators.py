"""The estimator contract, checked for every registered estimator.

``loss = est.estimate(model, x, y, *, generator=...)`` writes an estimate of ∂L/∂p into
``p.grad`` (replacing it), returns L = F.cross_entropy(model(x), y) detached and 0-d, draws all
its randomness from ``generator``, builds no autograd graph and (except backprop) never calls
reverse mode; bad batches and options are rejected with errors that name the bad value.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guessgrad
from guessgrad.estimators import ForwardGradient, register
from guessgrad.estimators.registry import _REGISTRY
from guessgrad.metrics import true_gradients


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def grads_of(model):
    return [p.grad for p in model.parameters()]


# ---------------------------------------------------------------- registry


def test_registry_lists_every_method():
    assert set(guessgrad.ESTIMATORS) >= {
        "backprop",
        "weight-perturbation",
        "activation-perturbation",
        "w-transpose",
        "w-perp",
        "w-perp-bottom",
        "w-precond",
    }
    assert len(set(guessgrad.ESTIMATORS)) == len(guessgrad.ESTIMATORS)


def test_make_estimator_builds_the_registered_class():
    assert isinstance(guessgrad.make_estimator("backprop"), guessgrad.Backprop)
    assert isinstance(guessgrad.make_estimator("w-transpose"), guessgrad.WTranspose)
    est = guessgrad.make_estimator("w-perp", k=4, solver="subspace")
    assert isinstance(est, guessgrad.WPerp)
    opts = est.options()
    assert {key: opts[key] for key in ("k", "subspace", "solver", "depth")} == {
        "k": 4,
        "subspace": "top",
        "solver": "subspace",
        "depth": 2,
    }
    bottom = guessgrad.make_estimator("w-perp-bottom", k=2)
    assert {key: bottom.options()[key] for key in ("k", "subspace", "solver")} == {
        "k": 2,
        "subspace": "bottom",
        "solver": "svd",
    }
    assert guessgrad.make_estimator("w-precond", sigma=0.5).options()["sigma"] == 0.5


def test_register_adds_a_name_and_refuses_duplicates(monkeypatch):
    monkeypatch.setattr("guessgrad.estimators.registry._REGISTRY", dict(_REGISTRY))
    saved = list(guessgrad.ESTIMATORS)
    try:
        register("test-only-backprop", guessgrad.Backprop)
        assert guessgrad.ESTIMATORS[-1] == "test-only-backprop"
        assert isinstance(guessgrad.make_estimator("test-only-backprop"), guessgrad.Backprop)
        with pytest.raises(ValueError, match="'backprop' is already registered"):
            register("backprop", guessgrad.Backprop)
    finally:
        guessgrad.ESTIMATORS[:] = saved


@pytest.mark.parametrize("name", ["backprob", "W-Perp", ""])
def test_unknown_estimator_name(name):
    with pytest.raises(ValueError, match=f"unknown estimator {name!r}.*w-perp"):
        guessgrad.make_estimator(name)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("backprop", {"k": 3}, r"'backprop' has no option 'k' \(it takes no options\)"),
        ("w-perp", {"sigma": 1e-3}, r"'w-perp' has no option 'sigma' \(its options: k, subspace,"),
        # the name fixes the solver (or the subspace): not an option there
        ("w-perp-ns", {"solver": "svd"}, r"'w-perp-ns' has no option 'solver' \(its options: k,"),
        ("w-perp-bottom", {"subspace": "top"}, r"no option 'subspace' \(its options: k, solver"),
    ],
)
def test_an_option_the_estimator_does_not_take_names_those_it_does(name, options, message):
    with pytest.raises(ValueError, match=message):
        guessgrad.make_estimator(name, **options)


@pytest.mark.parametrize("name", guessgrad.ESTIMATORS)
def test_every_listed_option_is_taken(name):
    """The options an error message lists are parameters of the estimator's constructor, less
    what the name fixes (w-perp-ns: the solver; w-perp-bottom: the subspace)."""
    import inspect

    from guessgrad.estimators import registry

    listed = registry._OPTIONS[name]
    est = guessgrad.make_estimator(name)
    params = set(inspect.signature(type(est)).parameters)
    fixed = {"w-perp-ns": {"solver"}, "w-perp-bottom": {"subspace"}}.get(name, set())
    assert listed is not None and set(listed) == params - fixed


def test_listed_options_build():
    assert isinstance(guessgrad.make_estimator("w-perp-ns", k=5, depth=2), guessgrad.WPerp)
    assert guessgrad.make_estimator("w-perp-bottom", k=3, solver="svd").options()["k"] == 3
    assert guessgrad.make_estimator("w-precond", sigma=1e-3, solver="closed-form")


# ---------------------------------------------------------------- shared contract


def test_grad_is_replaced_not_accumulated(estimator_case, model, batch):
    x, y = batch
    fresh = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    estimator_case.make().estimate(model, x, y, generator=seeded(0))
    estimator_case.make().estimate(fresh, x, y, generator=seeded(0))
    for got, want in zip(grads_of(model), grads_of(fresh)):
        assert torch.equal(got, want)


def test_same_seed_same_grads_bit_for_bit(estimator_case, model, batch):
    x, y = batch
    runs = []
    for seed in (3, 3, 4):
        m = copy.deepcopy(model)
        loss = estimator_case.make().estimate(m, x, y, generator=seeded(seed))
        runs.append((loss, grads_of(m)))
    (l1, g1), (l2, g2), (l3, g3) = runs
    assert torch.equal(l1, l2) and torch.equal(l1, l3)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    same_other_seed = all(torch.equal(a, c) for a, c in zip(g1, g3))
    if estimator_case.name == "backprop":
        assert same_other_seed
    else:
        assert not same_other_seed


def test_generator_state_is_the_only_randomness(estimator_case, model, batch):
    """The global RNG neither feeds nor is consumed by an estimate with an explicit generator."""
    x, y = batch
    torch.manual_seed(123)
    estimator_case.make().estimate(copy.deepcopy(model), x, y, generator=seeded(1))
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    estimator_case.make().estimate(m1, x, y, generator=seeded(1))
    torch.manual_seed(2)
    estimator_case.make().estimate(m2, x, y, generator=seeded(1))
    assert all(torch.equal(a, b) for a, b in zip(grads_of(m1), grads_of(m2)))


def test_loss_is_cross_entropy_detached_0d(estimator_case, model, batch):
    x, y = batch
    loss = estimator_case.make().estimate(model, x, y, generator=seeded(0))
    assert loss.dim() == 0 and loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach(), rtol=1e-13, atol=0)


def test_no_grad_context_and_no_graph(estimator_case, model, batch, monkeypatch):
    x, y = batch
    if not estimator_case.make().uses_backprop:

        def forbidden(*args, **kwargs):
            raise AssertionError("reverse-mode autograd was called")

        monkeypatch.setattr(torch.autograd, "grad", forbidden)
        monkeypatch.setattr(torch.autograd, "backward", forbidden)
        monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        loss = estimator_case.make().estimate(model, x, y, generator=seeded(2))
    monkeypatch.undo()
    estimator_case.make().estimate(reference, x, y, generator=seeded(2))
    assert loss.grad_fn is None and not loss.requires_grad
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.grad.grad_fn is None and not p.grad.requires_grad
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
        assert torch.equal(p.grad, q.grad)  # the no_grad context changes nothing
    for p in model.parameters():
        assert p.requires_grad  # the caller's parameters are left as they were


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_dtypes_and_bias_free_models(estimator_case, dtype, bias, make_mlp, make_batch):
    model = make_mlp(dtype=dtype, bias=bias, seed=2)
    x, y = make_batch(model, 4, seed=2)
    est = estimator_case.make()
    loss = est.estimate(model, x, y, generator=seeded(0))
    if isinstance(est, guessgrad.Backprop):
        _assert_autograd_grads(model, x, y)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach())
    for layer in guessgrad.linear_layers(model):
        assert layer.weight.grad.dtype == dtype
        assert torch.isfinite(layer.weight.grad).all()
        if bias:
            assert layer.bias.grad.dtype == dtype
            assert torch.isfinite(layer.bias.grad).all()
        else:
            assert layer.bias is None
    assert [n for n, _ in model.named_parameters()] == [
        n for n, p in model.named_parameters() if p.grad is not None
    ]


def _assert_autograd_grads(model, x, y):
    """``p.grad`` of ``model`` equals what ``loss.backward()`` gives on a copy of it."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.grad = None
    F.cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)


def test_batch_of_one(estimator_case, model, make_batch):
    x, y = make_batch(model, 1, seed=6)
    est = estimator_case.make()
    loss = est.estimate(model, x, y, generator=seeded(0))
    if isinstance(est, guessgrad.Backprop):
        _assert_autograd_grads(model, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach())
    layers = guessgrad.linear_layers(model)
    for layer in layers:
        assert torch.isfinite(layer.weight.grad).all()
    # a single example's weight estimate is an outer product ĝ xᵀ (rank ≤ 1) for every method
    # that guesses pre-activation gradients, and for backprop
    if not isinstance(estimator_case.make(), guessgrad.WeightPerturbation):
        for layer in layers:
            assert torch.linalg.matrix_rank(layer.weight.grad) <= 1


def test_entirely_inactive_hidden_layer(estimator_case, model, make_batch):
    """An example whose first hidden layer is all off (W̃_b = 0 there): no NaN anywhere, the
    loss is still the cross-entropy, and every guess lies in the range of its covariance (for
    the range-restricted guesses that example's layer-0 guess is exactly 0): along each
    eigenvector of C_b within 10 standard deviations sqrt(λ), λ known to n·eps·‖C_b‖ (an
    exact null space, or the small eigenvalues Newton–Schulz's polynomial leaves)."""
    x, y = make_batch(model, 4, seed=5, inactive=1)
    layers = guessgrad.linear_layers(model)
    assert (layers[0](x[1]) < 0).all()
    est = estimator_case.make()
    loss = est.estimate(model, x, y, generator=seeded(0))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach())
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()
    if not isinstance(est, ForwardGradient):
        return
    covs = {}

    def record(site, guess, state):
        covs[site.index] = guess.covariance(site, state)

    result = estimator_case.make().tangent_pass(layers, x, y, generator=seeded(0), on_site=record)
    assert torch.equal(result.sites[1].x[1], torch.zeros_like(result.sites[1].x[1]))
    for i, v in enumerate(result.injected):
        c = covs[i]
        assert torch.isfinite(c).all() and torch.isfinite(v).all()
        lam, u = torch.linalg.eigh(c)
        along = (u.mT @ v.unsqueeze(-1)).squeeze(-1)  # (B, n) components on the eigenvectors
        known = lam.shape[-1] * torch.finfo(c.dtype).eps * lam.amax(-1, keepdim=True)
        allowed = 10 * (lam.clamp_min(0) + known).sqrt() + 1e-12 * (1 + v.abs().max())
        assert (along.abs() <= allowed).all(), (along.abs() - allowed).max()
        if bool((c[1] == 0).all()):
            assert torch.equal(v[1], torch.zeros_like(v[1]))


@pytest.mark.parametrize("solver", ["svd", "subspace"])
@pytest.mark.parametrize("k", [9, 13, 40])
def test_w_perp_k_above_width_and_rank(solver, k, model, batch):
    """k above the width (8, 12, 6) and above rank(W̃_b): the guess spans the whole row space
    of W̃_b, so C_b g_b = g_b, and C_b is an orthogonal projector."""
    x, y = batch
    est = guessgrad.make_estimator("w-perp", k=k, solver=solver)
    est.estimate(copy.deepcopy(model), x, y, generator=seeded(0))
    layers = guessgrad.linear_layers(model)
    g, _ = true_gradients(layers, x, y)
    covs = {}

    def record(site, guess, state):
        covs[site.index] = guess.covariance(site, state)

    fresh = guessgrad.make_estimator("w-perp", k=k, solver=solver)
    result = fresh.tangent_pass(layers, x, y, generator=seeded(0), on_site=record)
    assert all(torch.isfinite(v).all() for v in result.injected)
    for i in range(len(layers) - 1):
        c = covs[i]
        torch.testing.assert_close(c @ c, c, rtol=0, atol=1e-12)
        torch.testing.assert_close(c.mT, c, rtol=0, atol=1e-14)
        cg = (c @ g[i].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(cg, g[i], rtol=0, atol=1e-14)


def test_integer_label_dtypes_agree(estimator_case, model, batch):
    """Labels of any integer dtype give the int64 result."""
    x, y = batch
    ref = copy.deepcopy(model)
    estimator_case.make().estimate(ref, x, y, generator=seeded(0))
    unsigned = [getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)]
    for dtype in (torch.int32, torch.uint8, *unsigned):  # no min/max for the wide unsigned
        m = copy.deepcopy(model)
        estimator_case.make().estimate(m, x, y.to(dtype), generator=seeded(0))
        assert all(torch.equal(a, b) for a, b in zip(grads_of(m), grads_of(ref)))


def test_frozen_parameters_are_left_alone_as_autograd_does(estimator_case, model, batch):
    """A layer with ``requires_grad=False`` gets no ``grad`` (backprop raised before); the other
    parameters get finite estimates, backprop's the same as without the freeze."""
    x, y = batch
    ref = copy.deepcopy(model)
    estimator_case.make().estimate(ref, x, y, generator=seeded(0))
    m = copy.deepcopy(model)
    frozen = guessgrad.linear_layers(m)[0]
    frozen.requires_grad_(False)
    est = estimator_case.make()
    est.estimate(m, x, y, generator=seeded(0))
    assert frozen.weight.grad is None and frozen.bias.grad is None
    for p, q in zip(m.parameters(), ref.parameters()):
        if p.requires_grad:
            assert bool(torch.isfinite(p.grad).all())
            if isinstance(est, guessgrad.Backprop):
                assert torch.equal(p.grad, q.grad)
    if isinstance(est, guessgrad.Backprop):
        _assert_autograd_grads(m, x, y)


def test_a_frozen_layer_gets_no_guess(forward_case, model, batch):
    """Its guess would estimate nothing and only add cross-layer noise to d_b: the tangent
    injected there is zero, its guess is never drawn, and d_b = Σ_i g_i·v_i over the others."""
    x, y = batch
    layers = guessgrad.linear_layers(model)
    layers[1].requires_grad_(False)
    drawn = []
    est = forward_case.make()
    result = est.tangent_pass(
        layers, x, y, generator=seeded(0), on_site=lambda site, g, s: drawn.append(site.index)
    )
    assert 1 not in drawn and drawn == [i for i in range(len(layers)) if i != 1]
    assert torch.equal(result.injected[1], torch.zeros_like(result.injected[1]))
    g, _ = true_gradients(layers, x, y)
    d = sum((gi * v).sum(1) for gi, v in zip(g, result.injected))
    torch.testing.assert_close(result.d, d, rtol=1e-10, atol=1e-14)


def test_weight_perturbation_perturbs_trainable_parameters_only(model, batch):
    """With every layer but the last frozen, the estimate is (∇L·V) V over the last layer's
    weight and bias alone: the first two draws of the generator, nothing else."""
    x, y = batch
    layers = guessgrad.linear_layers(model)
    for layer in layers[:-1]:
        layer.requires_grad_(False)
    last = layers[-1]
    guessgrad.make_estimator("weight-perturbation").estimate(model, x, y, generator=seeded(5))
    gen = seeded(5)
    v_w = torch.randn(last.weight.shape, generator=gen, dtype=last.weight.dtype)
    v_b = torch.randn(last.bias.shape, generator=gen, dtype=last.bias.dtype)
    exact = copy.deepcopy(model)
    guessgrad.Backprop().estimate(exact, x, y)
    top = guessgrad.linear_layers(exact)[-1]
    d = (top.weight.grad * v_w).sum() + (top.bias.grad * v_b).sum()
    torch.testing.assert_close(last.weight.grad, d * v_w, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(last.bias.grad, d * v_b, rtol=1e-10, atol=1e-14)
    assert all(layer.weight.grad is None for layer in layers[:-1])


def test_caller_tensors_are_not_modified(estimator_case, model, batch):
    x, y = batch
    x0, y0 = x.clone(), y.clone()
    params0 = [p.detach().clone() for p in model.parameters()]
    estimator_case.make().estimate(model, x, y, generator=seeded(0))
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params0))


def test_works_with_a_torch_optimizer(estimator_case, make_mlp, make_batch):
    """p.grad is what torch.optim reads: one SGD step moves p by exactly -lr · p.grad."""
    model = make_mlp(seed=1)
    x, y = make_batch(model, 6, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    estimator_case.make().estimate(model, x, y, generator=seeded(0))
    opt.step()
    for p, p0 in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * p.grad, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- bad batches


def bad_batch_cases(model, x, y):
    n = x.shape[0]
    return [
        ("1-d x", x[0], y, ValueError, r"x must have shape \(batch, 10\), got \(10,\)"),
        ("wrong features", x[:, :7], y, ValueError, r"x must have shape \(batch, 10\)"),
        ("empty batch", x[:0], y[:0], ValueError, "empty batch"),
        ("float32 x", x.float(), y, TypeError, "x has dtype torch.float32"),
        ("integer x", x.long(), y, TypeError, "x has dtype torch.int64"),
        (
            "nan x",
            x.clone().index_fill_(0, torch.tensor([1]), float("nan")),
            y,
            ValueError,
            "NaN or infinite",
        ),
        (
            "inf x",
            x.clone().index_fill_(1, torch.tensor([0]), float("inf")),
            y,
            ValueError,
            "NaN or infinite",
        ),
        ("label too big", x, y.clone().fill_(4), ValueError, "label 4 out of range for 4"),
        (  # both wrong: the labels are named first
            "label too big and nan x",
            x.clone().index_fill_(0, torch.tensor([1]), float("nan")),
            y.clone().fill_(4),
            ValueError,
            "label 4 out of range for 4",
        ),
        (
            "negative label",
            x,
            torch.where(torch.arange(n) == 2, -1, y),
            ValueError,
            "label -1 out of range",
        ),
        ("float labels", x, y.double(), TypeError, "integer class labels.*float64"),
        ("bool labels", x, y > 0, TypeError, "integer class labels.*bool"),
        ("short y", x, y[:-1], ValueError, rf"y must have shape \({n},\), got \({n - 1},\)"),
        ("2-d y", x, y.unsqueeze(1), ValueError, rf"y must have shape \({n},\)"),
        ("list x", x.tolist(), y, TypeError, "x and y must be tensors.*list"),
        ("x on another device", x.to("meta"), y, ValueError, "x is on meta but the model is on"),
        ("y on another device", x, y.to("meta"), ValueError, "y is on meta but x is on cpu"),
        ("sparse x", x.to_sparse(), y, TypeError, "must be dense tensors.*sparse_coo"),
    ]


def _bad_batch_names():
    x = torch.zeros(5, 10, dtype=torch.float64)
    return [case[0] for case in bad_batch_cases(None, x, torch.zeros(5, dtype=torch.int64))]


@pytest.mark.parametrize("index", range(len(_bad_batch_names())))
def test_bad_batches_are_rejected(estimator_case, index, model, batch):
    x, y = batch
    case = bad_batch_cases(model, x, y)[index]
    _, bx, by, error, match = case
    est = estimator_case.make()
    for p in model.parameters():
        p.grad = None
    with pytest.raises(error, match=match):
        est.estimate(model, bx, by, generator=seeded(0))
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"k": 0}, "k=0"),
        ({"k": -2}, "k=-2"),
        ({"k": 2.5}, "k=2.5"),
        ({"k": "3"}, "k='3'"),
        ({"k": True}, "k=True"),
        ({"k": None}, "k=None"),
        ({"k": 3, "solver": "lanczos"}, "unknown solver 'lanczos'.*svd.*subspace"),
        ({"k": 3, "subspace": "middle"}, "subspace='middle'"),
        ({"k": 3, "solver": "subspace", "depth": -1}, "depth=-1"),
        ({"k": 3, "solver": "subspace", "depth": 1.5}, "depth=1.5"),
        ({"k": 3, "solver": "subspace", "depth": True}, "depth=True"),
        ({"k": 3, "solver": "newton-schulz", "refresh": True}, "refresh=True"),
        ({"k": 3, "solver": "subspace", "block": 0}, "block=0"),
        ({"k": 3, "solver": "subspace", "ritz_iters": 0}, "ritz_iters=0"),
        ({"k": 3, "solver": "subspace", "ritz_iters": True}, "ritz_iters=True"),
        ({"k": 3, "solver": "subspace", "ritz_iters": 2.0}, "ritz_iters=2.0"),
        ({"k": 3, "solver": "subspace", "warm_start": 0}, "warm_start=0"),
        ({"k": 3, "solver": "subspace", "warm_start": "no"}, "warm_start='no'"),
        ({"k": 9, "solver": "subspace", "block": 2, "depth": 1}, "smaller than k=9"),
    ],
)
def test_bad_w_perp_options(options, match):
    with pytest.raises(ValueError, match=match):
        guessgrad.make_estimator("w-perp", **options)


def test_w_perp_takes_integers_of_any_type():
    """NumPy integers (from a config or a sweep) are ints, kept as Python ints for the JSON of a
    run's config; booleans are refused above."""
    import numpy as np

    est = guessgrad.make_estimator(
        "w-perp", k=np.int64(3), solver="subspace", depth=np.int32(1), ritz_iters=np.int16(5)
    )
    assert est.options()["k"] == 3 and type(est.options()["k"]) is int
    assert type(est.options()["depth"]) is int
    assert est.options()["ritz_iters"] == 5 and type(est.options()["ritz_iters"]) is int
    assert guessgrad.make_estimator("w-perp", warm_start=False).options()["warm_start"] is False


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"k": 0}, "k=0"),
        ({"k": "rank"}, "k='rank'"),
        ({"k": 3, "solver": "subspace"}, "subspace='bottom'"),
    ],
)
def test_bad_w_perp_bottom_options(options, match):
    with pytest.raises(ValueError, match=match):
        guessgrad.make_estimator("w-perp-bottom", **options)


@pytest.mark.parametrize("sigma", [0, -1e-5, float("inf"), float("nan"), "1e-5", True])
def test_bad_w_precond_sigma(sigma):
    with pytest.raises(ValueError, match="sigma="):
        guessgrad.make_estimator("w-precond", sigma=sigma)


def test_w_precond_sigma_takes_any_real_number():
    import numpy as np

    est = guessgrad.make_estimator("w-precond", sigma=np.float32(1e-3))
    assert type(est.options()["sigma"]) is float
    assert est.options()["sigma"] == pytest.approx(1e-3)


def test_a_bad_generator_is_refused_before_anything_is_written(estimator_case, model, batch):
    x, y = batch
    for p in model.parameters():
        p.grad = None
    est = estimator_case.make()
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        est.estimate(model, x, y, generator=0)
    assert all(p.grad is None for p in model.parameters())


def test_a_generator_on_another_device_type_is_refused():
    """Where it would draw: backprop, which draws nothing, takes any generator."""
    from guessgrad.estimators.base import check_generator

    check_generator(None, torch.device("meta"))
    check_generator(seeded(0), torch.device("cpu"))
    check_generator(seeded(0), None)
    with pytest.raises(ValueError, match=r"generator is on cpu but the batch on meta: use torch"):
        check_generator(seeded(0), torch.device("meta"))


# ---------------------------------------------------------------- bad models


def bad_models():
    return [
        (
            "conv",
            nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Conv1d(8, 4, 1)),
            TypeError,
            r"'2' \(Conv1d\)",
        ),
        (
            "sigmoid",
            nn.Sequential(nn.Linear(10, 8), nn.Sigmoid(), nn.Linear(8, 4)),
            TypeError,
            r"'1' \(Sigmoid\)",
        ),
        (
            "missing relu",
            nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 4)),
            ValueError,
            "'1' at position 1 is Linear but ReLU",
        ),
        (
            "ends in relu",
            nn.Sequential(nn.Linear(10, 8), nn.ReLU()),
            ValueError,
            "ends in nn.ReLU '1'",
        ),
        (
            "starts with relu",
            nn.Sequential(nn.ReLU(), nn.Linear(10, 4)),
            ValueError,
            "'0' at position 0 is ReLU but Linear",
        ),
        (
            "widths",
            nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(7, 4)),
            ValueError,
            "'2' expects 7 inputs but the previous layer gives 8",
        ),
        ("not sequential", nn.Linear(10, 4), TypeError, "unsupported model Linear"),
        (
            "module list",
            nn.ModuleList([nn.Linear(10, 4)]),
            TypeError,
            "unsupported model ModuleList",
        ),
        ("empty", nn.Sequential(), ValueError, "empty nn.Sequential"),
        (
            "in-place relu",
            nn.Sequential(nn.Linear(10, 8), nn.ReLU(inplace=True), nn.Linear(8, 4)),
            ValueError,
            "'1': in-place ReLU",
        ),
        (
            "mixed dtypes",
            nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4).double()),
            TypeError,
            "must all be float32 or all float64",
        ),
        (
            "half",
            nn.Sequential(nn.Linear(10, 4)).half(),
            TypeError,
            "must all be float32 or all float64",
        ),
    ]


@pytest.mark.parametrize("index", range(len(bad_models())))
def test_unsupported_models_are_rejected(estimator_case, index):
    _, model, error, match = bad_models()[index]
    x = torch.zeros(3, 10)
    y = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(error, match=match):
        estimator_case.make().estimate(model, x, y, generator=seeded(0))


def test_inference_mode_is_refused_but_its_tensors_are_accepted(estimator_case, model, batch):
    """Under ``torch.inference_mode()`` the estimates would be inference tensors that an
    optimizer cannot update afterwards (backprop cannot run at all): a clear error.  A batch
    made under inference mode and used outside it gives the usual estimate."""
    x, y = batch
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.inference_mode"):
        estimator_case.make().estimate(model, x, y, generator=seeded(0))
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    ref = copy.deepcopy(model)
    estimator_case.make().estimate(ref, x, y, generator=seeded(0))
    estimator_case.make().estimate(model, xi, yi, generator=seeded(0))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # in place: not inference tensors
