"""How a layer shrinks. Zero pruning holds weights at zero with torch.nn.utils.prune's masks, the
structure unchanged; neuron and channel removal rebuilds every layer of a chain smaller: a
weighted layer loses rows (output units), the next one the matching columns (input units,
a block of columns per channel after a Flatten), and a BatchNorm in between the same channels."""

import contextlib
import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from pruning import chain as chains
from pruning.model import KeepInputs, Normalize, evaluating, kept_inputs, weight_matrices, weight_tensors

# Zeros ---------------------------------------------------------------------------------

def hold_below(model: nn.Module, threshold: float) -> nn.Module:
    """Hold the weights with |w| < threshold of every weight matrix of model (model.weight_tensors)
    at zero, in place, with pruning masks that keep them zero through training; returns model."""
    return hold_masked(model, [w.detach().abs() >= threshold for w in weight_matrices(model)])


def hold_masked(model: nn.Module, keep: Sequence[torch.Tensor]) -> nn.Module:
    """Hold at zero, in place, the weights of every weight matrix of model (model.weight_tensors:
    each nn.Linear's and convolution's, and nn.MultiheadAttention's input projections) that its
    boolean mask in `keep` (one per matrix, in order) marks False; returns model."""
    for (module, name), mask in zip(weight_tensors(model), keep, strict=True):
        prune.custom_from_mask(module, name, mask)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask of model into its tensor, leaving ordinary layers; returns model."""
    for module in model.modules():
        for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]:
            prune.remove(module, hook._tensor_name)
    return model


def copy_of(model):
    """A deep copy of model, pruning masks and all. A masked weight is a tensor its mask computes,
    which deepcopy refuses while it records a gradient: it is computed afresh without one first
    (the same numbers; every forward computes it again anyway)."""
    with torch.no_grad():
        for layer in model.modules():
            for hook in layer._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    setattr(layer, hook._tensor_name, hook.apply_mask(layer))
    return copy.deepcopy(model)


@contextlib.contextmanager
def masks_folded(model):
    """Within: the pruning masks of model's layers folded into plain weights, yielding the
    (weight, mask) pairs for the caller to re-apply with hold() after each update: one multiply a
    step, where a mask costs one in every forward and one in every backward. The weights it holds
    see the same numbers either way. After: the masks back, over the weights as trained."""
    held = []
    for module, name in weight_tensors(model):
        if hasattr(module, f"{name}_mask"):
            mask = getattr(module, f"{name}_mask")
            prune.remove(module, name)
            held.append((module, name, mask))
    try:
        yield [(getattr(module, name), mask) for module, name, mask in held]
    finally:
        for module, name, mask in held:
            prune.custom_from_mask(module, name, mask)


@torch.no_grad()
def hold(held):
    """Zero again what the masks of masks_folded() hold at zero."""
    for weight, mask in held:
        weight.mul_(mask)


# Neurons and channels -------------------------------------------------------------------

@torch.no_grad()
def spatial(layers, example):
    """Per weighted layer, how many columns of the next weighted layer each of its outputs feeds:
    the positions of its channel after a Flatten, else 1. example: one input of the network."""
    shapes, x = [], example[:1]
    with evaluating(layers), torch.no_grad():
        for layer in layers:
            x = layer(x)
            shapes.append(x.shape)
    out = []
    for i, between, _ in chains.groups(layers):
        flat = next((k for k in between if isinstance(layers[k], nn.Flatten)), None)
        out.append(math.prod(shapes[flat - 1][2:]) if flat is not None else 1)
    return out


def unit_widths(layers):
    """The first weighted layer's inputs followed by every weighted layer's outputs."""
    first = layers[chains.groups(layers)[0][0]]
    return [first.weight.shape[1], *(layers[i].weight.shape[0] for i, _, _ in chains.groups(layers))]


def params_at(layers, widths, spatial):
    """The parameters the chain would hold with these unit widths (as unit_widths gives them)."""
    total = 0
    for g, (i, between, _) in enumerate(chains.groups(layers)):
        layer, units = layers[i], widths[g + 1]
        columns = widths[g] * (spatial[g - 1] if g else 1) * math.prod(layer.weight.shape[2:])
        total += columns * units + (units if layer.bias is not None else 0)
        total += sum(2 * units for k in between if isinstance(layers[k], chains.PER_CHANNEL) and layers[k].affine)
    return total


def target_widths(layers, spatial, max_params, prune_inputs):
    """Every unit layer's width (the inputs' too with prune_inputs; never the outputs') scaled by one
    factor, the largest that leaves at most max_params parameters: the cut spread evenly."""
    widths = unit_widths(layers)
    fixed = {len(widths) - 1} | (set() if prune_inputs else {0})

    def scaled(factor):
        return [w if i in fixed else max(1, math.floor(factor * w)) for i, w in enumerate(widths)]
    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if params_at(layers, scaled(middle), spatial) <= max_params else (low, middle)
    return scaled(low)


@torch.no_grad()
def remove_units(layers, keep, spatial, inputs=None, means=None):
    """A new nn.Sequential of the chain without the units whose keep entry is False: keep holds a
    mask per weighted layer but the last. With means (bias compensation), every removed neuron's
    mean activation times its outgoing weights is folded into the next layer's bias, where that
    layer reads it directly (an nn.Linear after an nn.Linear); a layer whose entry is None folds
    nothing. inputs, a mask over the first
    layer's input pixels and each pixel's mean value, removes the pixels masked out the same way,
    always folding their means: a constant pixel goes without changing any output."""
    groups = chains.groups(layers)
    new = list(layers)
    device = layers[groups[0][0]].weight.device
    for g, (i, between, _) in enumerate(groups):
        old = layers[i]
        rows = keep[g] if g < len(keep) else torch.ones(old.weight.shape[0], dtype=torch.bool, device=device)
        if g == 0:
            columns = inputs[0] if inputs else torch.ones(old.weight.shape[1], dtype=torch.bool, device=device)
            folded = inputs[1] if inputs else None
        else:
            columns = keep[g - 1].repeat_interleave(spatial[g - 1])
            direct = spatial[g - 1] == 1 and isinstance(old, nn.Linear) and all(
                isinstance(layers[k], chains.ELEMENTWISE + chains.DROPOUTS) for k in groups[g - 1][1])
            folded = means[g - 1] if means and means[g - 1] is not None and direct else None
        new[i] = rebuilt(old, rows, columns, folded)
        for k in between:
            if isinstance(layers[k], chains.PER_CHANNEL):
                new[k] = fewer_channels(layers[k], rows)
    if inputs:
        new = with_pixels(new, groups[0][0], kept_inputs(nn.Sequential(*layers))[inputs[0]],
                          layers[groups[0][0]].weight.shape[1], device)
    return nn.Sequential(*new)


def with_pixels(layers, first, pixels, inputs, device):
    """The chain reading only these input pixels: a KeepInputs first, before a Normalize (which then
    normalises only them), in place of any KeepInputs it had. inputs: what the first layer read."""
    keeper = next((m for m in layers[:first] if isinstance(m, KeepInputs)), None)
    norm = next((m for m in layers[:first] if isinstance(m, Normalize)), None)
    size = keeper.size if keeper else math.prod(norm.shape) if norm else inputs
    rest = [Normalize(norm.mean, norm.std, (len(pixels),)) if m is norm else m for m in layers if m is not keeper]
    return [KeepInputs(pixels, size).to(device), *rest]


def rebuilt(old, rows, columns, folded):
    """old (nn.Linear or nn.Conv2d) with only the outputs in rows and the inputs in columns; the
    inputs' mean values in folded, if given, go into the bias."""
    rows_i, columns_i = rows.nonzero().squeeze(1), columns.nonzero().squeeze(1)
    weight = old.weight.detach()
    if isinstance(old, nn.Linear):  # skip_init: every number is copied in below
        new = nn.utils.skip_init(nn.Linear, len(columns_i), len(rows_i), bias=old.bias is not None,
                                 device=weight.device, dtype=weight.dtype)
    else:
        new = nn.utils.skip_init(nn.Conv2d, len(columns_i), len(rows_i), old.kernel_size, old.stride, old.padding,
                                 old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode,
                                 device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight[rows_i][:, columns_i])
    if old.bias is not None:
        bias = old.bias.detach().clone()
        if folded is not None:
            gone = ~columns
            bias += weight[:, gone] @ folded[gone]
        new.bias.copy_(bias[rows_i])
    new.train(old.training)
    return new


def fewer_channels(norm, rows):
    new = copy.deepcopy(norm)
    index = rows.nonzero().squeeze(1)
    new.num_features = len(index)
    for name in ("weight", "bias"):
        if getattr(norm, name) is not None:
            setattr(new, name, nn.Parameter(getattr(norm, name).detach()[index].clone()))
    for name in ("running_mean", "running_var"):
        if getattr(norm, name) is not None:
            setattr(new, name, getattr(norm, name)[index].clone())
    return new


@torch.no_grad()
def reestimate_batchnorm(model, inputs, batch_size=500):
    """Measure every BatchNorm's running statistics of model afresh on inputs (their plain mean
    over the batches, not a moving one), the rest of model in eval mode: a cut changes what the
    layers after it see, and statistics of the network before the cut would normalise it wrongly
    (a residual network cut by a third without fine-tuning went from 95% to chance). Leaves every
    module in the mode it had; returns model."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or len(inputs) == 0:
        return model
    momenta = [m.momentum for m in norms]
    with evaluating(model):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # the cumulative mean over the batches
            m.training = True
        try:
            for x in inputs.split(batch_size):
                model(x)
        finally:  # evaluating gives every module its mode back
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
    return model

