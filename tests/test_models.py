"""The supported models: ``guessgrad.MLP`` and the ``linear_layers`` check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import guessgrad
from guessgrad.jacobians import (
    MaskedLinearJacobian,
    UpstreamJacobian,
    active_groups,
    column_gram,
    dense_active,
    expand_columns,
)


def test_mlp_structure():
    model = guessgrad.MLP([40, 16, 12, 10])
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    layers = guessgrad.linear_layers(model)
    assert [(la.in_features, la.out_features) for la in layers] == [(40, 16), (16, 12), (12, 10)]
    assert all(la is m for la, m in zip(layers, [model[0], model[2], model[4]]))
    assert all(la.weight.dtype == torch.float32 for la in layers)


def test_mlp_initialisation():
    """PyTorch's default weights (uniform in ±1/sqrt(fan_in)) and zero biases (paper §4)."""
    torch.manual_seed(0)
    model = guessgrad.MLP([40, 128, 10])
    for layer in guessgrad.linear_layers(model):
        bound = 1 / layer.in_features**0.5
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert layer.weight.abs().max() <= bound
        # uniform on [-bound, bound]: standard deviation bound / sqrt(3)
        assert abs(float(layer.weight.detach().std()) - bound / 3**0.5) < 0.1 * bound
    torch.manual_seed(0)
    again = guessgrad.MLP([40, 128, 10])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_mlp_takes_any_integer_widths():
    import numpy as np

    model = guessgrad.MLP([np.int64(6), 5, torch.tensor(3).item()])
    assert [type(la.in_features) for la in guessgrad.linear_layers(model)] == [int, int]
    for bad in ([6, 5.0, 3], [6, True, 3], [6, 0, 3]):
        with pytest.raises(ValueError, match="positive integers"):
            guessgrad.MLP(bad)


def test_mlp_without_bias():
    model = guessgrad.MLP([5, 4, 3], bias=False)
    assert all(la.bias is None for la in guessgrad.linear_layers(model))
    assert len(list(model.parameters())) == 2


def test_single_linear_layer_is_supported():
    model = guessgrad.MLP([5, 3])
    assert list(model) == [model[0]] and isinstance(model[0], nn.Linear)
    assert guessgrad.linear_layers(model) == [model[0]]


@pytest.mark.parametrize(
    ("widths", "match"),
    [
        ([10], r"at least an input and an output width, got widths=\[10\]"),
        ([], "at least an input"),
        ([10, 0, 4], r"positive integers, got widths=\[10, 0, 4\]"),
        ([10, 2.5, 4], "positive integers"),
        ([10, True, 4], "positive integers"),
        ([10, -3, 4], "positive integers"),
    ],
)
def test_mlp_rejects_bad_widths(widths, match):
    with pytest.raises(ValueError, match=match):
        guessgrad.MLP(widths)


def test_linear_layers_accepts_float64_and_plain_sequentials():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    assert guessgrad.linear_layers(model) == [model[0], model[2]]


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), TypeError, r"'1' \(Tanh\)"),
        (
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 2)),
            TypeError,
            r"'2' \(Dropout\) at position 2",
        ),
        (
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 2)),
            ValueError,
            "'2' at position 2 is ReLU but Linear was expected",
        ),
        (nn.Sequential(nn.LazyLinear(4)), TypeError, "LazyLinear"),
        (nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(), nn.Linear(4, 2)), TypeError, "LeakyReLU"),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), TypeError, r"'0' \(Flatten\)"),
        (
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2))),
            TypeError,
            r"'2' \(Sequential\)",
        ),
    ],
)
def test_linear_layers_names_the_offending_module(model, error, match):
    with pytest.raises(error, match=match):
        guessgrad.linear_layers(model)


def test_one_relu_at_several_positions_is_fine_but_a_tied_linear_is_refused():
    """nn.Sequential may hold one module at several positions: every position counts (a shared
    ReLU was refused, and a Linear used twice was seen once, a shorter network than model(x))."""
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(10, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 4))
    assert guessgrad.linear_layers(model) == [model[0], model[2], model[4]]
    hidden = nn.Linear(8, 8)
    tied = nn.Sequential(nn.Linear(10, 8), relu, hidden, relu, hidden, nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="'4' at position 4 is a Linear already used"):
        guessgrad.linear_layers(tied)


def test_shared_parameters_pruning_and_hooks_are_refused():
    """Each of these made the forward-gradient estimators silently wrong: a weight shared by two
    layers got only the last layer's share of its gradient, a pruned layer's estimate went to
    the computed weight (not the parameter the optimizer steps) and hooks were skipped."""
    import torch.nn.utils.prune as prune

    def mlp() -> nn.Sequential:
        return guessgrad.MLP([8, 8, 8, 4])

    shared = mlp()
    shared[2].weight = shared[0].weight
    with pytest.raises(ValueError, match="'2': its weight is a parameter of an earlier layer"):
        guessgrad.linear_layers(shared)
    shared = mlp()
    shared[2].bias = shared[0].bias
    with pytest.raises(ValueError, match="'2': its bias is a parameter of an earlier layer"):
        guessgrad.linear_layers(shared)
    pruned = mlp()
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match="'0' has forward hooks"):
        guessgrad.linear_layers(pruned)
    prune.remove(pruned[0], "weight")  # permanent: a plain parameter again
    assert guessgrad.linear_layers(pruned)[0] is pruned[0]
    hooked = mlp()
    hooked.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match="the model has forward hooks"):
        guessgrad.linear_layers(hooked)
    hooked = mlp()
    hooked[1].register_forward_hook(lambda module, args, out: None)
    with pytest.raises(ValueError, match="'1' has forward hooks"):
        guessgrad.linear_layers(hooked)
    computed = mlp()
    del computed[0].weight
    computed[0].weight = torch.zeros(8, 8)  # a plain tensor, not a parameter
    with pytest.raises(ValueError, match="weight is not an nn.Parameter"):
        guessgrad.linear_layers(computed)


def test_overridden_forward_extra_parameters_and_other_hooks_are_refused():
    """Each of these made every estimator compute another function's gradient than model(x)'s,
    or backprop and the forward-gradient estimators disagree: an overridden forward was skipped,
    a parameter no layer uses got no gradient, and global module hooks and gradient hooks on a
    parameter ran for backprop's autograd only."""
    from torch.nn.modules import module as torch_module

    class Scaled(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 10 * super().forward(x)

    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    scaled = Scaled(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(TypeError, match="Scaled overrides nn.Sequential.forward"):
        guessgrad.Backprop().estimate(scaled, x, y)
    patched = guessgrad.MLP([8, 8, 4])
    patched[2].forward = lambda h: 2 * h
    with pytest.raises(TypeError, match="'2' has its own forward"):
        guessgrad.linear_layers(patched)

    extra = guessgrad.MLP([8, 8, 4])
    extra.register_parameter("temperature", nn.Parameter(torch.ones(())))
    with pytest.raises(ValueError, match="its own parameter 'temperature'"):
        guessgrad.Backprop().estimate(extra, x, y)
    extra = guessgrad.MLP([8, 8, 4])
    extra[0].register_parameter("scale", nn.Parameter(torch.ones(8)))
    with pytest.raises(ValueError, match="'0' holds parameter 'scale' beside"):
        guessgrad.linear_layers(extra)

    for register in (
        torch_module.register_module_forward_hook,
        torch_module.register_module_forward_pre_hook,
        torch_module.register_module_full_backward_hook,
    ):
        handle = register(lambda *args: None)
        try:
            with pytest.raises(ValueError, match="global module hooks are registered"):
                guessgrad.WTranspose().estimate(guessgrad.MLP([8, 8, 4]), x, y)
        finally:
            handle.remove()
    assert guessgrad.linear_layers(guessgrad.MLP([8, 8, 4]))  # removed: accepted again

    hooked = guessgrad.MLP([8, 8, 4])
    handle = hooked[2].weight.register_hook(lambda g: 0 * g)
    with pytest.raises(ValueError, match="'2': its weight has gradient hooks"):
        guessgrad.linear_layers(hooked)
    handle.remove()
    assert guessgrad.linear_layers(hooked)[1] is hooked[2]
    handle = hooked[0].bias.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(0))
    with pytest.raises(ValueError, match="'0': its bias has gradient hooks"):
        guessgrad.linear_layers(hooked)
    handle.remove()
    assert guessgrad.linear_layers(hooked)[0] is hooked[0]
    hooked[0].register_full_backward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="'0' has backward hooks"):
        guessgrad.linear_layers(hooked)


def test_named_modules_are_named_in_errors():
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), act=nn.GELU(), fc2=nn.Linear(4, 2)))
    with pytest.raises(TypeError, match=r"'act' \(GELU\)"):
        guessgrad.linear_layers(model)


def test_masked_linear_jacobian_matches_dense():
    """W̃_b = W diag(mask_b); apply, apply_t and gram_apply agree with the dense matrices."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = (torch.rand(3, 7, generator=gen) > 0.4).double()
    jac = MaskedLinearJacobian(w, mask)
    assert isinstance(jac, UpstreamJacobian)
    assert (jac.batch, jac.rows, jac.cols, jac.dtype) == (3, 5, 7, torch.float64)
    dense = torch.stack([w @ torch.diag(m) for m in mask])
    torch.testing.assert_close(jac.dense(), dense, rtol=0, atol=0)
    v = torch.randn(3, 2, 7, generator=gen, dtype=torch.float64)  # (B, p, n)
    u = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)  # (B, p, m)
    torch.testing.assert_close(jac.apply(v), v @ dense.mT, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(jac.apply_t(u), u @ dense, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(jac.gram_apply(v), v @ dense.mT @ dense, rtol=1e-13, atol=1e-13)
    restricted = jac.restrict(v)
    torch.testing.assert_close(
        jac.gram_apply(restricted, restricted=True), v @ dense.mT @ dense, rtol=1e-13, atol=1e-13
    )
    # one vector per example: (B, n) -> (B, m)
    torch.testing.assert_close(jac.apply(v[:, 0]), (dense @ v[:, 0, :, None])[..., 0])


def test_masked_linear_jacobian_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(5, 7\) and \(3, 6\)"):
        MaskedLinearJacobian(torch.zeros(5, 7), torch.zeros(3, 6))


def test_dense_active_keeps_every_nonzero_column():
    """W̃_b restricted to its active columns holds all of W̃_b: put back, it is the dense matrix
    exactly; r is the batch's largest active count (or ``at_least``), active columns first."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    mask = (torch.rand(5, 9, generator=gen) > 0.5).double()
    mask[1] = 0.0  # no active unit
    jac = MaskedLinearJacobian(w, mask)
    compact, index = dense_active(jac)
    count = int(mask.sum(1).max())
    assert compact.shape == (5, 4, count) and index.shape == (5, count)
    assert compact.is_contiguous()
    torch.testing.assert_close(expand_columns(compact, index, 9), jac.dense(), rtol=0, atol=0)
    for b in range(5):  # the active units come first, in order
        active = torch.nonzero(mask[b]).flatten()
        assert index[b, : len(active)].tolist() == active.tolist()
    assert dense_active(jac, at_least=count + 2)[1].shape == (5, count + 2)
    full, none = dense_active(jac, at_least=20)  # all n columns: no restriction
    assert none is None and torch.equal(full, jac.dense())


def test_dense_active_without_known_columns_is_dense():
    """A Jacobian without ``active_columns`` is used densely."""

    class Plain:
        def __init__(self, inner):
            self.inner = inner
            self.cols = inner.cols

        def dense(self):
            return self.inner.dense()

    w = torch.randn(3, 5, dtype=torch.float64)
    jac = MaskedLinearJacobian(w, torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    dense, index = dense_active(Plain(jac))
    assert index is None and torch.equal(dense, jac.dense())
    assert expand_columns(dense, None, 5) is dense


def test_active_groups_cover_every_example_with_all_its_active_columns():
    """Groups hold every example once, ordered by active count; each group's columns are its
    examples' active units first and number max(at_least, the group's largest count)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    mask = (torch.rand(11, 12, generator=gen) > torch.linspace(0.1, 0.9, 11)[:, None]).double()
    mask[3] = 0.0
    jac = MaskedLinearJacobian(w, mask)
    counts = mask.sum(1).long()
    groups = active_groups(jac, at_least=2, size=4)
    assert [len(ex) for ex, _ in groups] == [4, 4, 3]
    order = torch.cat([ex for ex, _ in groups])
    assert sorted(order.tolist()) == list(range(11))
    assert counts[order].tolist() == sorted(counts.tolist())
    for examples, index in groups:
        assert index.shape == (len(examples), max(2, int(counts[examples].max())))
        for row, b in zip(index, examples.tolist()):
            active = torch.nonzero(mask[b]).flatten().tolist()
            assert row[: len(active)].tolist() == active
            assert len(set(row.tolist())) == len(row)  # distinct columns
    whole = active_groups(jac, at_least=2)
    assert len(whole) == 1 and whole[0][1].shape == (11, int(counts.max()))


def test_column_gram_is_the_dense_gram_on_those_columns():
    """The gathered W̃_bᵀW̃_b equals the product of the dense columns; a Jacobian without
    ``column_gram`` or ``active_columns`` falls back to the dense Gram."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    mask = (torch.rand(6, 9, generator=gen) > 0.5).double()
    mask[2] = 0.0
    jac = MaskedLinearJacobian(w, mask)
    for examples, index in active_groups(jac, at_least=3, size=4):
        cols = torch.gather(
            jac.dense()[examples], 2, index.unsqueeze(1).expand(-1, 5, -1)
        )  # (g, m, r)
        torch.testing.assert_close(
            column_gram(jac, examples, index), cols.mT @ cols, rtol=0, atol=1e-12
        )

    class Plain:
        batch, cols = jac.batch, jac.cols
        device = jac.device

        def dense(self):
            return jac.dense()

    [(examples, index)] = active_groups(Plain())
    assert index is None and examples.tolist() == list(range(6))
    dense = jac.dense()
    torch.testing.assert_close(
        column_gram(Plain(), examples, None), dense.mT @ dense, rtol=0, atol=1e-12
    )
