"""Sparse variational dropout on tiny models whose answers can be worked out by hand."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from pruning import training, variational
from pruning.model import mlp


def test_the_prior_term_by_hand_at_no_noise_even_noise_and_all_noise():
    k1, k2, k3 = variational.KL_CONSTANTS
    weight = torch.tensor([1.0, 1.0, 1.0])
    log_variance = torch.tensor([-10.0, 0.0, 10.0])  # log alpha -10, 0 and 10, the ends of its range
    expected = [k1 - k1 * torch.sigmoid(torch.tensor(k2 + k3 * a)).item() + 0.5 * math.log1p(math.exp(-a))
                for a in (-10.0, 0.0, 10.0)]
    assert variational.kl_divergence(weight, log_variance).item() == pytest.approx(sum(expected), rel=1e-6)
    assert expected[0] > expected[1] > expected[2] and expected[2] < 1e-4  # noise costs nothing, precision costs


def test_log_alpha_is_the_log_of_variance_over_squared_weight_within_its_range():
    alpha = variational.log_alpha(torch.tensor([2.0, 1e-6, 1e6]), torch.tensor([0.0, 0.0, 0.0]))
    assert alpha.tolist() == pytest.approx([-math.log(4.0), 10.0, -10.0], rel=1e-5)


def test_the_noise_of_a_linear_layer_has_the_variance_of_noise_on_each_weight():
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        layer.bias.fill_(0.5)
    layer.log_variance = nn.Parameter(torch.log(torch.tensor([[0.25, 1.0]])))
    layer.register_forward_hook(variational.noisy_forward(torch.Generator().manual_seed(0)))
    x = torch.tensor([[2.0, 3.0]]).expand(200_000, 2)
    out = layer(x).detach()
    assert out.mean().item() == pytest.approx(2.0 - 6.0 + 0.5, abs=0.02)
    assert out.var().item() == pytest.approx(0.25 * 4 + 1.0 * 9, rel=0.02)  # sum of x_i^2 sigma_i^2
    layer.eval()
    assert torch.equal(layer(x[:1]), torch.tensor([[-3.5]]))  # no noise outside training


def test_the_noise_of_a_convolution_has_the_variance_of_noise_on_each_weight():
    layer = nn.Conv2d(1, 1, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    layer.log_variance = nn.Parameter(torch.zeros_like(layer.weight))
    layer.register_forward_hook(variational.noisy_forward(torch.Generator().manual_seed(0)))
    x = torch.full((100_000, 1, 2, 2), 2.0)
    out = layer(x).detach()
    assert out.shape == (100_000, 1, 1, 1)
    assert out.var().item() == pytest.approx(4 * 4.0, rel=0.02)


def test_dropout_training_zeroes_the_weights_on_inputs_that_carry_nothing_and_keeps_the_rest():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(512, 1), torch.zeros(512, 3)], 1)  # only the first input varies
    y = (x[:, 0] > 0).long()
    model = mlp([4, 8, 2])
    variational.sparse_variational_dropout(model, (x, y), epochs=40, strength=1.0, lr=0.01, batch_size=64)
    first = model[0].weight
    assert (first[:, 1:] == 0).all()  # the prior alone speaks for them, and it wants them gone
    assert (first[:, 0] != 0).any()
    assert training.accuracy(model, (x, y)) > 95
    assert all(not hasattr(m, "log_variance") and not m._forward_hooks for m in model)  # ordinary layers again


def test_dropout_training_is_refused_for_a_model_with_pruning_masks():
    model = mlp([2, 2])
    prune.identity(model[0], "weight")
    with pytest.raises(ValueError, match="without pruning masks"):
        variational.sparse_variational_dropout(model, (torch.zeros(4, 2), torch.zeros(4).long()), epochs=1)
