"""Sparse variational dropout (Molchanov, Ashukha and Vetrov 2017): every weight gets Gaussian
noise of a variance it learns, and a log-uniform prior rewards noise, so that a network trained so
learns which weights it can do without. A weight whose noise drowns its value (log alpha, the
log of variance over squared weight, at least 3) is zero afterwards: on LeNet-300-100 about 98%
of them after 10 epochs at strength 10 (README, the frontier)."""

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

from pruning import training
from pruning.model import weighted
from pruning.training import Data, Recipe, Teacher

LOG_ALPHA_CUT = 3.0  # the paper's: noise over 20 times the weight's size
LOG_ALPHA_RANGE = 10.0
INITIAL_LOG_VARIANCE = -10.0
KL_CONSTANTS = 0.63576, 1.87320, 1.48695  # the paper's fit of the KL divergence to the prior


def log_alpha(weight, log_variance):
    return (log_variance - torch.log(weight.square() + 1e-8)).clamp(-LOG_ALPHA_RANGE, LOG_ALPHA_RANGE)


def kl_divergence(weight, log_variance):
    """The paper's approximation of KL(q(w) || p(w)), the log-uniform prior, summed over the weights:
    0 for a weight that is all noise, growing as its noise shrinks."""
    k1, k2, k3 = KL_CONSTANTS
    a = log_alpha(weight, log_variance)
    return (k1 - k1 * torch.sigmoid(k2 + k3 * a) + 0.5 * F.softplus(-a)).sum()


def noisy_forward(generator):
    """A forward hook: in training mode, adds to a layer's output the noise its weights' variances
    cause, drawn for each output (the local reparameterisation trick: the same distribution as noise
    on every weight, with one draw an output instead of one a weight and example)."""
    def hook(layer, inputs, output):
        if not layer.training:
            return None
        variance = layer.log_variance.exp()
        x = inputs[0].square()
        spread = (F.linear(x, variance) if isinstance(layer, nn.Linear)
                  else layer._conv_forward(x, variance, None)).add(1e-8).sqrt()
        return output + spread * torch.randn(output.shape, generator=generator, device=output.device,
                                             dtype=output.dtype)
    return hook


def sparse_variational_dropout(model: nn.Module, data: Data, recipe: Recipe | None = None, *, strength: float = 10.0,
                               teacher: Teacher = None, progress: Callable | None = None,
                               **options: Any) -> nn.Module:
    """Train model on data, (x, y), as the recipe (and options, any of its fields by name) says, with
    sparse variational dropout on the weights of
    every nn.Linear and nn.Conv2d, then zero each weight with log alpha >= 3. The loss is
    training.train()'s (distilling from teacher when given) plus strength times the prior's term,
    the KL divergence divided by the number of training examples (1 is the variational bound; more
    drives more weights to zero), its weight growing linearly from 0 over the first half of the
    steps; teacher and progress as train() takes them. Changes model in place and returns it,
    ordinary layers again.

    Example:
        >>> pruning.sparse_variational_dropout(model, (x, y), epochs=10, strength=10.0)
    """
    recipe = training.recipe_of(recipe, options, "sparse_variational_dropout")
    layers = weighted(model)
    if any(prune.is_pruned(layer) for layer in layers):
        raise ValueError("sparse variational dropout takes a model without pruning masks")
    device = layers[0].weight.device
    generator = torch.Generator(device).manual_seed(recipe.seed)
    handles = []
    for layer in layers:
        layer.log_variance = nn.Parameter(torch.full_like(layer.weight, INITIAL_LOG_VARIANCE))
        handles.append(layer.register_forward_hook(noisy_forward(generator)))
    ramp_steps = max(1, recipe.epochs * math.ceil(len(data[0]) / recipe.batch_size) / 2)
    step = itertools.count(1)

    def prior():
        ramp = min(1.0, next(step) / ramp_steps)
        return strength * ramp * sum(kl_divergence(layer.weight, layer.log_variance) for layer in layers) / len(data[0])
    try:
        training.train(model, data, recipe, teacher=teacher, penalty=prior, progress=progress)
        with torch.no_grad():
            for layer in layers:
                layer.weight.masked_fill_(log_alpha(layer.weight, layer.log_variance) >= LOG_ALPHA_CUT, 0.0)
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            del layer.log_variance
    return model
