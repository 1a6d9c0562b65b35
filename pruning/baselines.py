"""What a pruning method is set beside for a fair comparison (Blalock et al. 2020): random
pruning, and magnitude pruning with every layer cut by the same fraction, at the same sparsity;
for removing units, random units and each layer's units by the norm of their weights, at the
same widths."""

import torch

from pruning import chain, criteria
from pruning.model import weighted


@torch.no_grad()
def random_zeros(model, sparsity, seed=0):
    """Zero the fraction `sparsity` of model's weights (every weighted layer together), chosen at
    random (seeded), in place; returns model."""
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.rand(layer.weight.shape, generator=generator) for layer in weighted(model)]
    for layer, keep in zip(weighted(model), criteria.keep_largest(scores, sparsity)):
        layer.weight.mul_(keep.to(layer.weight.device))
    return model


@torch.no_grad()
def layerwise_zeros(model, sparsity):
    """Zero the smallest weights of each weighted layer, the fraction `sparsity` of each, in place;
    returns model."""
    for layer in weighted(model):
        (keep,) = criteria.keep_largest([layer.weight.abs()], sparsity)
        layer.weight.mul_(keep)
    return model


def random_units(seed=0):
    """A criterion for activation_prune and methods.shrink: units ranked at random (seeded)."""
    def criterion(layers, pixel_mean):
        generator = torch.Generator().manual_seed(seed)
        sizes = [len(pixel_mean)] + [layers[i].weight.shape[0] for i, _, j in chain.groups(layers)
                                     if j is not None]
        return [torch.rand(n, generator=generator).to(pixel_mean.device) for n in sizes]
    return criterion


def weight_norm_units(layers, pixel_mean):
    """A criterion for activation_prune and methods.shrink: each unit by the norm of the weights
    into it (its row or filter), each input pixel by its column's in the first layer."""
    groups = chain.groups(layers)
    first = layers[groups[0][0]].weight.detach()
    pixels = first.norm(dim=0) if first.dim() == 2 else torch.ones_like(pixel_mean)
    return [pixels, *(layers[i].weight.detach().flatten(1).norm(dim=1) for i, _, j in groups if j is not None)]
