"""What to remove: weights by magnitude or by saliency (what zeroing each costs the loss), ranked
over all layers together; neurons and channels by their mean activation, by what they pass on
(mean activation times the norm of their outgoing weights) or by saliency; input pixels by how
much they vary."""

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from pruning import chain as chains
from pruning.model import weight_matrices, weighted
from pruning.training import EVAL_BATCH


def magnitudes(model: nn.Module) -> torch.Tensor:
    """|w| of every weight of weight_tensors(model), flattened into one tensor."""
    return torch.cat([w.detach().abs().flatten() for w in weight_matrices(model)])


def cut_for_sparsity(values, sparsity):
    """The value at which dropping every value up to it, ties included, drops at least the fraction
    `sparsity` of the 1-d tensor values; None where that drops nothing."""
    k = math.ceil(round(sparsity * len(values), 6))  # rounded first: 5/6 of 6 is 5.000000000000001
    return None if k == 0 else values.kthvalue(k).values


def threshold_for_sparsity(model: nn.Module, sparsity: float) -> float:
    """The smallest threshold that zeroes at least that fraction of all weights."""
    cut = cut_for_sparsity(magnitudes(model), sparsity)
    return 0.0 if cut is None else torch.nextafter(cut, torch.tensor(1.0)).item()


def keep_largest(scores: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Masks, one per tensor of scores, that keep the largest scores over all tensors together and
    drop at least the fraction `sparsity` of all, every tie at the cut dropped with it."""
    cut = cut_for_sparsity(torch.cat([s.flatten() for s in scores]), sparsity)
    return [torch.ones_like(s, dtype=torch.bool) if cut is None else s > cut for s in scores]


def mean_squared_gradients(losses, tensors):
    """The mean over `losses` (an iterable, one loss a batch) of the squared gradient of each loss
    with respect to each of tensors; their .grad are not touched."""
    sums, batches = [torch.zeros_like(t) for t in tensors], 0
    for loss in losses:
        for total, grad in zip(sums, torch.autograd.grad(loss, tensors)):
            total.add_(grad.square())
        batches += 1
    return [total / max(batches, 1) for total in sums]


def saliencies(model, losses):
    """Each weight's saliency, w^2 times the mean over `losses` (one loss a batch, each computed
    from model) of its squared gradient: Optimal Brain Damage's estimate of what zeroing the weight
    costs (LeCun et al. 1990), with the empirical Fisher's diagonal standing for the Hessian's. A
    list with a tensor shaped as each weighted layer's weight; the weights' .grad are not touched."""
    weights = [layer.weight for layer in weighted(model)]
    return [w.detach().square() * f for w, f in zip(weights, mean_squared_gradients(losses, weights))]


NONNEGATIVE = (nn.ReLU, nn.ReLU6)  # after these a unit's mean is how much it carries


@torch.no_grad()
def statistics(layers, x, batch_size=EVAL_BATCH):
    """Run x through a chain of layers in batches. Returns (activity, pixel_std, pixel_mean,
    folds): per weighted layer but the last, each output's activity over images and positions,
    taken after the first element-wise activation that follows it (else where the next weighted
    layer reads it): after a ReLU its mean, after a signed activation (GELU, Tanh, ...) its
    standard deviation, what it carries beyond a constant; per such layer its outputs' means
    (None after a ReLU), which removal folds into the next layer's bias; and the standard
    deviation and mean of each input pixel the first weighted layer reads."""
    groups = chains.groups(layers)
    measure_at = measured_at(layers)
    first = groups[0][0]
    sums, squares = [0.0] * (len(groups) - 1), [0.0] * (len(groups) - 1)
    pixel_sum = pixel_squares = 0.0
    for xb in x.split(batch_size):
        for k, layer in enumerate(layers):
            if k == first:
                inputs = xb.flatten(1).double()
                pixel_sum, pixel_squares = pixel_sum + inputs.sum(0), pixel_squares + (inputs ** 2).sum(0)
            xb = layer(xb)
            if k in measure_at:
                g, dims = measure_at[k], [d for d in range(xb.dim()) if d != 1]
                positions = math.prod(xb.shape[d] for d in dims[1:])
                sums[g] = sums[g] + xb.double().sum(dims) / positions
                squares[g] = squares[g] + xb.double().square().sum(dims) / positions
    n = len(x)
    pixel_mean = pixel_sum / n
    pixel_var = ((pixel_squares - n * pixel_mean ** 2) / max(n - 1, 1)).clamp(min=0)
    means = [s / n for s in sums]
    spread = [(q / n - m ** 2).clamp(min=0).sqrt() for q, m in zip(squares, means)]
    signed = [not nonnegative for nonnegative in unsigned(layers)]
    activity = [(d if s else m).float() for m, d, s in zip(means, spread, signed)]
    folds = [m.float() if s else None for m, s in zip(means, signed)]
    return activity, pixel_var.sqrt().float(), pixel_mean.float(), folds


def unsigned(layers):
    """Per weighted layer but the last, whether its outputs are read after a ReLU (never negative)."""
    at = measured_at(layers)
    return [isinstance(layers[k], NONNEGATIVE) for k in sorted(at, key=at.get)]


def measured_at(layers):
    """{index of a layer: group g} for each weighted layer but the last: where its units' values are
    read, after the first element-wise activation that follows it, else where the next weighted
    layer reads them."""
    at = {}
    for g, (i, between, _) in enumerate(chains.groups(layers)[:-1]):
        activation = next((k for k in between if isinstance(layers[k], chains.ELEMENTWISE)), None)
        last = max([i, *(k for k in between if not isinstance(layers[k], nn.Flatten))])
        at[activation if activation is not None else last] = g
    return at


def unit_saliencies(layers, pixel_mean, losses):
    """Per unit layer, the input pixels first, each unit's saliency: the mean over losses(forward)
    (one loss a batch, each computed with forward, the chain run with a gate of 1 on every unit)
    of the squared gradient of the loss with respect to the unit's gate. A gate scales a unit's
    values where statistics() reads them, and a pixel's deviation from pixel_mean (its mean, as
    statistics() gives it, which removal folds into the bias): what removing the unit costs,
    estimated as Optimal Brain Damage does for a weight, with the gate as the weight (Molchanov
    et al. 2019)."""
    groups = chains.groups(layers)
    first, at = groups[0][0], measured_at(layers)
    gates = [torch.ones_like(pixel_mean, requires_grad=True),
             *(torch.ones(layers[groups[g][0]].weight.shape[0], device=pixel_mean.device, requires_grad=True)
               for g in at.values())]

    def forward(x):
        for k, layer in enumerate(layers):
            if k == first:
                centre = pixel_mean.view(x.shape[1:])
                x = centre + gates[0].view(x.shape[1:]) * (x - centre)
            x = layer(x)
            if k in at:
                x = x * gates[at[k] + 1].view(-1, *[1] * (x.dim() - 2))
        return x

    return mean_squared_gradients(losses(forward), gates)


def outgoing(layers, g, width, spatial):
    """Group g's outputs' outgoing weights, one row per output: its columns in the next weighted layer."""
    _, _, j = chains.groups(layers)[g]
    weight = layers[j].weight
    if isinstance(layers[j], nn.Conv2d):
        return weight.transpose(0, 1).flatten(1)
    return weight.view(weight.shape[0], width, spatial).transpose(0, 1).flatten(1)


def outgoing_norms(layers, g, width, spatial):
    """The norm of each of group g's outputs' outgoing weights."""
    return outgoing(layers, g, width, spatial).detach().norm(dim=1)


def unit_norms(layers, spatial, prune_inputs=False):
    """Per unit layer, the input pixels first with prune_inputs, the norm of each unit's weights:
    into it (its row or filter, and its bias) and out of it (its columns in the next weighted
    layer) together; a pixel's: its column in the first layer. Differentiable: group lasso's
    groups, one per unit that the cut can remove."""
    groups = chains.groups(layers)
    norms = [layers[groups[0][0]].weight.norm(dim=0)] if prune_inputs else []
    for g, (i, _, _) in enumerate(groups[:-1]):
        layer = layers[i]
        biases = [] if layer.bias is None else [layer.bias[:, None]]
        weights = [layer.weight.flatten(1), *biases, outgoing(layers, g, layer.weight.shape[0], spatial[g])]
        norms.append(torch.cat(weights, 1).norm(dim=1))  # whose gradient at a zero norm is zero
    return norms


def scores(layers, x, criterion, spatial):
    """(strength, means, folds): per unit layer, the input pixels first, how much each unit carries
    and its activity; per hidden layer, the means removal folds (statistics). 'activation': a
    unit's activity (after a ReLU its mean activation), a pixel's standard deviation over x (a
    constant pixel carries no information, however bright); 'contribution': that times the norm
    of the unit's outgoing weights, what it actually passes on; a function (as methods.unit_saliency
    gives): its scores, criterion(layers, pixel_mean). spatial: per group, how many columns of the
    next layer each output feeds (positions after a Flatten, else 1)."""
    activity, pixel_std, pixel_mean, folds = statistics(layers, x)
    strength = [pixel_std, *activity]
    if callable(criterion):
        strength = criterion(layers, pixel_mean)
    elif criterion == "contribution":
        first = layers[chains.groups(layers)[0][0]]
        pixels = pixel_std * first.weight.detach().norm(dim=0) if reads_pixels(layers) else pixel_std
        strength = [pixels, *(s * outgoing_norms(layers, g, len(s), spatial[g]) for g, s in enumerate(activity))]
    return strength, [pixel_mean, *activity], folds


def strongest(strength, width):
    keep = torch.zeros_like(strength, dtype=torch.bool)
    keep[strength.argsort(descending=True, stable=True)[:width]] = True
    return keep


def neurons_to_keep(means, threshold, multiple=1):
    """Per hidden layer, a mask of the neurons with mean activation >= threshold. A layer is never
    emptied: where no neuron reaches the threshold the strongest one stays (its index is in `rescued`).
    With multiple > 1 each width is rounded up to a multiple of it by also keeping the strongest
    neurons below the threshold, since matrix kernels run faster on such widths."""
    keep, rescued = [], []
    for i, m in enumerate(means):
        above = (m >= threshold).sum().item()
        if above == 0:
            rescued.append(i)
        keep.append(strongest(m, min(len(m), multiple * math.ceil(max(above, 1) / multiple))))
    return keep, rescued


def reads_pixels(layers):
    """Whether the first weighted layer reads single input values (an nn.Linear), which can be pruned."""
    return isinstance(layers[chains.groups(layers)[0][0]], nn.Linear)
