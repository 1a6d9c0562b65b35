"""Pruning without retraining (pruning.one_shot), N:M patterns and the baselines, on tiny models
with answers worked by hand."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune

import pruning
from pruning import baselines, methods, oneshot, units
from pruning import model as models


def linear(weights, bias=0.0):
    layer = nn.Linear(len(weights), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
        layer.bias.fill_(bias)
    return nn.Sequential(layer)


def test_keep_in_pattern_keeps_the_n_largest_of_every_m():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.1], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    keep = oneshot.keep_in_pattern(scores, (2, 4))
    assert keep.tolist() == [[True, False, True, False, True, True, False],
                             [False, False, True, True, False, True, True]]  # the last group of 3 keeps 2


@pytest.mark.parametrize("pattern", [(2, 2), (0, 4), (3, 2), [2, 4], (2.0, 4), (1, 65)])
def test_a_pattern_must_be_n_of_m(pattern):
    with pytest.raises(ValueError, match="pattern"):
        oneshot.check_pattern(pattern, None)


def test_a_pattern_fixes_the_sparsity():
    with pytest.raises(ValueError, match="zeroes 0.5 of the weights, not 0.9"):
        oneshot.check_pattern((2, 4), 0.9)


def test_the_reconstruction_moves_a_pruned_weight_onto_the_input_that_repeats_it():
    model = linear([1.0, 0.5])  # its two inputs are always equal: 0.5 x2 can ride on x1
    t = torch.linspace(-1, 1, 64)[:, None]
    x = torch.cat([t, t], 1)
    before = model(x).detach()
    oneshot.one_shot(model, x, 0.5)
    w = sorted(model[0].weight.detach().flatten().tolist())
    assert w[0] == 0 and w[1] == pytest.approx(1.5, rel=0.02)  # damped least squares: not quite exact
    assert torch.allclose(model(x), before, rtol=0.02, atol=0.02)


def test_the_refit_solves_each_row_on_its_kept_weights_whichever_side_is_smaller():
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    damped, targets = x.T @ x + torch.eye(6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    pruned = torch.tensor([[1.0, 0, 0, 0, 0, 2.0],  # keeps 2 of 6: solved on them
                           [1.0, 1, 1, 1, 0, 1],    # keeps 5 of 6: solved on its one zero
                           [0.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    out = oneshot.refitted(pruned, damped, targets)
    for r, kept in enumerate(([0, 5], [0, 1, 2, 3, 5])):
        expected = torch.linalg.solve(damped[kept][:, kept], targets[r, kept])
        assert torch.allclose(out[r, kept], expected, atol=1e-12)
    assert out[1, 4] == 0 and out[2].eq(0).all() and out[0, 1:5].eq(0).all()


def test_magnitude_drops_the_smaller_weight_and_wanda_the_one_that_reads_less():
    x = torch.tensor([[1.0, 10.0], [-1.0, -10.0]])  # input norms sqrt(2) and 10 sqrt(2)
    by_magnitude = oneshot.one_shot(linear([1.0, 0.5]), x, 0.5, method="magnitude")
    by_wanda = oneshot.one_shot(linear([1.0, 0.5]), x, 0.5, method="wanda")  # scores 1.4 and 7.1
    assert by_magnitude[0].weight.tolist() == [[1.0, 0.0]]
    assert by_wanda[0].weight.tolist() == [[0.0, 0.5]]


@pytest.mark.parametrize("method", oneshot.METHODS)
def test_one_shot_reaches_its_sparsity_layer_by_layer_as_global_magnitude_allocates(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                          nn.Linear(196, 32), nn.ReLU(), nn.Linear(32, 10))  # LeNet-5's kinds of layer, smaller
    expected = oneshot.layer_sparsities([units.Unit(m) for m in models.weighted(model)], 0.9)
    x = torch.rand(200, 1, 28, 28)
    pruned = oneshot.one_shot(copy.deepcopy(model), x, 0.9, method=method)
    got = [(layer.weight == 0).float().mean().item() for layer in models.weighted(pruned)]
    assert got == pytest.approx(expected, abs=2e-3)
    assert pruning.count_zeros(pruned) / pruning.count_weights(pruned) == pytest.approx(0.9, abs=1e-3)
    again = oneshot.one_shot(copy.deepcopy(model), x, 0.9, method=method)
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), again.state_dict().values()))


def test_one_shot_in_a_pattern_keeps_two_of_every_four_and_the_mode():
    torch.manual_seed(0)
    model = models.mnist_mlp((784, 32, 16, 10)).train()
    oneshot.one_shot(model, torch.rand(800, 784), None, method="reconstruct", pattern=(2, 4))
    assert model.training
    for layer in models.weighted(model):
        assert (layer.weight.view(layer.weight.shape[0], -1, 4) != 0).sum(2).max() <= 2
        assert (layer.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("bad", [dict(method="obs"), dict(sparsity=1.0), dict(sparsity=None),
                                 dict(inputs=torch.zeros(0, 784))])
def test_one_shot_checks_its_arguments_before_any_change(bad):
    torch.manual_seed(0)
    model = models.mnist_mlp((784, 8, 10))
    state = copy.deepcopy(model.state_dict())
    args = {"inputs": torch.rand(4, 784), "sparsity": 0.5, "method": "reconstruct", **bad}
    with pytest.raises(ValueError):
        oneshot.one_shot(model, **args)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_zero_prune_in_a_pattern():
    torch.manual_seed(0)
    model = methods.zero_prune(models.mlp((8, 8, 4)), 0.5, pattern=(2, 4))
    for layer in models.weighted(model):
        assert (layer.weight.view(layer.weight.shape[0], -1, 4) != 0).sum(2).tolist() == \
            [[2, 2]] * layer.weight.shape[0]


def test_the_zero_baselines_zero_as_many_weights():
    torch.manual_seed(0)
    model = models.mlp((20, 10, 5))
    randomly = baselines.random_zeros(copy.deepcopy(model), 0.6, seed=1)
    assert pruning.count_zeros(randomly) == round(0.6 * 250)
    evenly = baselines.layerwise_zeros(copy.deepcopy(model), 0.6)
    assert [(layer.weight == 0).sum().item() for layer in models.weighted(evenly)] == [120, 30]


def test_the_unit_baselines_cut_to_the_same_widths():
    torch.manual_seed(0)
    model = models.mlp((20, 10, 6, 3))
    layers = pruning.chain.layers(model)
    x = torch.rand(32, 20)
    for criterion in (baselines.random_units(0), baselines.weight_norm_units):
        cut = methods.shrink(model, [20, 4, 2, 3], x, criterion, False, [1, 1, 1])
        assert models.widths(cut) == (20, 4, 2, 3)
    norms = baselines.weight_norm_units(layers, torch.zeros(20))
    assert torch.allclose(norms[1], model[0].weight.norm(dim=1))


def unchanged(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad,message", [
    (dict(inputs=torch.rand(900, 784).double()), "cannot run on these calibration inputs"),
    (dict(inputs=torch.full((900, 784), float("nan"))), "all of them finite"),
    (dict(inputs=torch.rand(16, 784)), r"layer 1 \(Linear\) reads 784 inputs.*at least 196 calibration inputs"),
    (dict(sparsity=[0.5]), "sparsity must be a number"), (dict(sparsity="0.5"), "sparsity must be a number"),
    (dict(sparsity=torch.tensor(0.5)), "sparsity must be a number")])
def test_one_shot_refuses_in_one_line_and_leaves_the_model(bad, message):
    torch.manual_seed(0)
    model = models.mnist_mlp((784, 8, 10))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        oneshot.one_shot(model, **{"inputs": torch.rand(900, 784), "sparsity": 0.5, **bad})
    assert unchanged(model, state)


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_one_shot_failing_part_way_leaves_the_model_as_it_was(interrupt):
    class FailsLater(nn.Module):
        calls = 0

        def forward(self, x):
            FailsLater.calls += 1
            if FailsLater.calls == 6:  # after the first layer was pruned
                raise interrupt()
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), FailsLater(), nn.Linear(16, 4))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(interrupt):
        oneshot.one_shot(model, torch.rand(600, 20), 0.5)
    assert unchanged(model, state)


def test_sparsity_zero_changes_nothing():
    torch.manual_seed(0)
    model = models.mnist_mlp((784, 8, 10))
    state = copy.deepcopy(model.state_dict())
    oneshot.one_shot(model, torch.rand(900, 784), 0)
    assert unchanged(model, state)


@pytest.mark.parametrize("padding,mode", [("same", "zeros"), ("valid", "zeros"), (1, "reflect"), (2, "circular")])
def test_the_unfolded_inputs_are_what_the_convolution_multiplies(padding, mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 4), padding=padding, padding_mode=mode, dilation=(1, 2))
    x = torch.randn(5, 2, 9, 10)
    rows = units.inputs_of(conv, x)
    by_rows = (rows @ conv.weight.flatten(1).T + conv.bias).view(5, -1, 3)
    assert torch.allclose(by_rows, conv(x).flatten(2).transpose(1, 2), atol=1e-5)


def test_one_shot_runs_layer_by_layer_through_a_residual_graph():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(20, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.head(torch.cat([h + self.b(h), x], 1))

    torch.manual_seed(0)
    model, x = Residual(), torch.randn(400, 10)
    before, magnitude = model(x).detach(), copy.deepcopy(model)
    oneshot.one_shot(model, x, 0.5)
    oneshot.one_shot(magnitude, x, 0.5, method="magnitude")
    assert pruning.count_zeros(model) == pytest.approx(0.5 * pruning.count_weights(model), abs=1)
    assert (model(x) - before).norm() <= (magnitude(x) - before).norm()


def test_a_model_with_pruning_masks_keeps_them_and_reaches_the_sparsity():
    torch.manual_seed(0)
    model = models.mnist_mlp((784, 16, 10))
    prune.l1_unstructured(model[1], "weight", amount=0.6)
    held = model[1].weight == 0
    oneshot.one_shot(model, torch.rand(900, 784), 0.8)
    model(torch.rand(2, 784))  # the masks' hook computes the weights again
    assert pruning.count_zeros(model) == pytest.approx(0.8 * pruning.count_weights(model), abs=1)
    assert (model[1].weight[held] == 0).all() and prune.is_pruned(model)


def test_a_model_with_nothing_to_prune_is_refused():
    with pytest.raises(ValueError, match="runs no nn.Linear, nn.Conv2d or nn.MultiheadAttention"):
        oneshot.one_shot(nn.Sequential(nn.ReLU()), torch.rand(4, 3), 0.5)


def tiny_encoder(seed=0, heads=2):
    """A transformer encoder layer over 5 tokens of 8 features and a linear head: 3 classes."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=heads, dim_feedforward=16, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Flatten(), nn.Linear(40, 3))


def test_an_attentions_output_projection_reads_its_heads_outputs():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(4, 2, batch_first=True).eval()
    x = torch.rand(3, 5, 4)
    q, k, v = (x @ w.T + b for w, b in zip(attention.in_proj_weight.split(4), attention.in_proj_bias.split(4)))
    by_hand = torch.cat([torch.softmax(q[..., h] @ k[..., h].transpose(1, 2) / 2 ** 0.5, -1) @ v[..., h]
                         for h in (slice(0, 2), slice(2, 4))], -1)  # two heads of two features
    output = units.Unit(attention, "output")
    assert torch.allclose(output.inputs((x, x, x), {}), by_hand.flatten(0, 1), atol=1e-6)
    assert torch.allclose(attention(x, x, x)[0], by_hand @ attention.out_proj.weight.T + attention.out_proj.bias,
                          atol=1e-6)
    key = units.Unit(attention, "key")
    assert torch.equal(key.inputs((x,), {"key": 2 * x, "value": x}), 2 * x.flatten(0, 1))
    assert torch.equal(key.matrix(), attention.in_proj_weight[4:8])


@pytest.mark.parametrize("method", oneshot.METHODS)
def test_one_shot_prunes_every_projection_of_a_transformer(method):
    model, x = tiny_encoder().eval(), torch.rand(400, 5, 8)
    with torch.no_grad():
        dense = model(x)
    pruned = oneshot.one_shot(copy.deepcopy(model), x, 0.5, method=method)
    attention = pruned[0].layers[0].self_attn
    for weight in (attention.in_proj_weight, attention.out_proj.weight):
        assert 0.2 < (weight == 0).float().mean() < 0.8  # each its share of a global ranking
    assert pruning.count_zeros(pruned) / pruning.count_weights(pruned) == pytest.approx(0.5, abs=1e-3)
    if method == "reconstruct":  # the reconstruction comes closer to the dense outputs than magnitude
        magnitude = oneshot.one_shot(copy.deepcopy(model), x, 0.5, method="magnitude")
        with torch.no_grad():
            assert (pruned(x) - dense).square().mean() < 0.9 * (magnitude(x) - dense).square().mean()


def test_attention_with_pruning_masks_is_refused_in_one_line_and_the_model_left_as_it_was():
    model = tiny_encoder()
    prune.l1_unstructured(model[0].layers[0].self_attn, "in_proj_weight", amount=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^layer 0.layers.0.self_attn \(MultiheadAttention\) carries pruning masks"):
        pruning.one_shot(model, torch.rand(64, 5, 8), 0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
