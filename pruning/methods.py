"""The two pruning methods, each toward a target in steps on the cubic schedule with fine-tuning
after every step: zeros (the structure stays, the weights get sparse) and neuron and channel
removal (the structure shrinks); the saliencies that rank weights and units by what removing them
costs; and the group-lasso penalty that trains a network to spare units before they are removed."""

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from pruning import blocks, chain, channels, criteria, graph, oneshot, surgery, training
from pruning.model import count_params, evaluating, weight_matrices, weight_tensors, weighted
from pruning.schedules import cubic_schedule
from pruning.training import Data, Finetune, Teacher

MAX_STEPS = 1000


def check_steps(steps):
    if type(steps) is not int or not 0 < steps <= MAX_STEPS:
        raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}, not {steps!r}")


def zero_prune(model: nn.Module, sparsity: float, *, steps: int = 1, finetune: Finetune | None = None,
               saliency: Callable | None = None, pattern: tuple[int, int] | None = None) -> nn.Module:
    """Zero the weights of every nn.Linear and nn.Conv1d, 2d and 3d of model (any nn.Module, whatever
    its graph) and of nn.MultiheadAttention's input projections (pruning.weight_tensors), smallest
    in magnitude first over all of them together, until the fraction
    `sparsity` of them is zero: in `steps` steps on the
    cubic schedule, calling finetune(model) after each with the zeros held. saliency: None, or a
    function of the model giving every weighted layer's scores (as obd_saliency's does) to rank
    the weights by, re-scored before each step, in place of their magnitudes. pattern=(n, m):
    every step keeps the n best of every m consecutive weights of each row instead (sparsity
    1 - n/m). Changes model in place and returns it, with ordinary layers (no masks left)."""
    oneshot.check_pattern(pattern, sparsity)
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be from 0 to below 1, not {sparsity}")
    check_steps(steps)
    tensors = weight_tensors(model)
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv layer whose weights can be zeroed")
    if saliency and len(tensors) != len(weighted(model)):
        raise ValueError("saliency scores nn.Linear and convolution weights, and this model also holds "
                         "nn.MultiheadAttention's input projections: rank by magnitude (no saliency)")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for target in cubic_schedule(sparsity, steps):
            scores = saliency(model) if saliency else [w.detach().abs() for w in weight_matrices(model)]
            keep = [oneshot.keep_in_pattern(s, pattern) for s in scores] if pattern else \
                criteria.keep_largest(scores, target)
            surgery.hold_masked(model, keep)
            if finetune:
                finetune(model)
            surgery.make_permanent(model)
    except BaseException:  # a failing saliency or fine-tuning, an interrupt: the model as it was, no masks
        surgery.make_permanent(model)
        if model.state_dict().keys() == before.keys():
            with torch.no_grad():
                model.load_state_dict(before)
        raise
    return model


def activation_prune(model: nn.Module, inputs: torch.Tensor, reduction: float, *, steps: int = 1,
                     finetune: Finetune | None = None, prune_inputs: bool = False,
                     criterion: str | Callable = "contribution") -> nn.Module:
    """Remove hidden neurons and conv channels of model (and its input pixels with prune_inputs),
    measured on the tensor `inputs`, until the fraction `reduction` of its parameters is gone:
    in `steps` steps on the cubic schedule, every layer cut by one factor, the units that pass on
    least going first (criterion 'contribution'; 'activation': the least active; or a function
    such as unit_saliency's, which scores them), re-measuring before and calling finetune(model)
    after each step. Returns a new, smaller nn.Sequential (a pruning.graph.Graph for residual sums and
    concatenations) in the mode model was in; model itself is left as it was. A model holding
    attention or transformer blocks keeps its own class and forward, and loses whole attention
    heads and feed-forward units instead (pruning.blocks)."""
    if not 0 <= reduction < 1:
        raise ValueError(f"reduction must be from 0 to below 1, not {reduction}")
    check_steps(steps)
    if criterion not in ("activation", "contribution") and not callable(criterion):
        raise ValueError(f"criterion must be 'activation', 'contribution' or a function, not {criterion!r}")
    if blocks.has_blocks(model):
        if prune_inputs:
            raise chain.NotAChain("prune_inputs is for a network whose first weighted layer reads the pixels, "
                                  "not a transformer")
        return blocks.prune_blocks(model, inputs, reduction, steps, finetune, criterion)
    try:
        layers = chain.layers(model)
    except chain.NotAChain as not_a_chain:
        joined = joins(model, not_a_chain)
        if prune_inputs or callable(criterion):
            raise chain.NotAChain(f"{not_a_chain}; a network with residual sums or concatenations is pruned by "
                                  "'activation' or 'contribution', without prune_inputs") from None
        return graph_prune(joined, inputs, reduction, steps, finetune, criterion)
    chain.groups(layers)
    if prune_inputs and not criteria.reads_pixels(layers):
        raise chain.NotAChain("prune_inputs needs a network whose first weighted layer is an nn.Linear")
    mode = model.training
    spatial = surgery.spatial(layers, inputs)
    original = count_params(nn.Sequential(*layers))
    pruned = nn.Sequential(*layers).train(mode)
    if reduction == 0:
        return copy.deepcopy(pruned)  # nothing to remove: not even the one unit a cut to a width rounds away
    for r in cubic_schedule(reduction, steps):
        widths = surgery.target_widths(layers, spatial, (1 - r) * original, prune_inputs)
        pruned = surgery.reestimate_batchnorm(shrink(pruned, widths, inputs, criterion, prune_inputs, spatial), inputs)
        if finetune:
            finetune(pruned)
    return pruned.train(mode)


def joins(model, not_a_chain):
    """model's Graph when what made it no chain is a residual sum or a concatenation; else the
    chain reader's refusal stands (or the graph reader's, which names the join it cannot take)."""
    joined = graph.of(model)
    if not any(isinstance(layer, graph.JOINS) for layer in joined.layers):
        raise not_a_chain
    return joined


def graph_prune(joined, inputs, reduction, steps, finetune, criterion):
    """activation_prune on a network with residual sums and concatenations (graph.py): every channel
    space cut by one fraction (channels.py), the channels joined by a sum together."""
    channels.prunable(joined, inputs)
    mode, original = joined.training, count_params(joined)
    pruned = graph.Graph([copy.deepcopy(layer) for layer in joined.layers], joined.inputs).train(mode)
    if reduction == 0:
        return pruned
    for r in cubic_schedule(reduction, steps):
        pruned = surgery.reestimate_batchnorm(channels.shrink(pruned, inputs, (1 - r) * original, criterion), inputs)
        if finetune:
            finetune(pruned)
    return pruned.train(mode)


def mean_activations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per hidden layer of model (a chain), each neuron's or channel's mean activation over the
    images x, measured in eval mode after the ReLU that follows it (after a signed activation,
    its standard deviation): what remove_below cuts by."""
    layers = thresholded(model, "mean_activations")
    with evaluating(layers):
        means, _, _, _ = criteria.statistics(layers, x)
    return means


def thresholded(model, call):
    """model's chain, for a cut by threshold; a network with residual sums or concatenations, whose
    channels a sum joins have no one mean to compare, refused in one line saying what cuts it."""
    try:
        return chain.layers(model)
    except chain.NotAChain as not_a_chain:
        joins(model, not_a_chain)  # what is no such network either is refused as it is
        raise chain.NotAChain(f"{not_a_chain}; {call} is for chains: cut a network with residual sums or "
                              "concatenations with activation_prune(model, inputs, reduction, criterion='activation')"
                              ) from None


def remove_below(model: nn.Module, means: list[torch.Tensor], threshold: float, *, multiple_of: int = 1,
                 compensate: bool = False, example: torch.Tensor | None = None) -> tuple[nn.Sequential, list[int]]:
    """A new, smaller nn.Sequential of model without the hidden neurons and channels whose mean
    activation (means, as mean_activations gives them) is below threshold; a layer that would be
    emptied keeps its strongest unit. multiple_of: each width rounded up to a multiple of it
    with the strongest units below the threshold. compensate: every removed neuron's mean
    activation times its outgoing weights folded into the next layer's bias (after a ReLU; after
    a signed activation, means is not its mean). example: one input,
    needed for a convolutional model (where a channel's columns lie after its Flatten).
    Returns (the model, the indices of the layers that kept only their strongest unit)."""
    layers = thresholded(model, "remove_below")
    keep, rescued = criteria.neurons_to_keep(means, threshold, multiple_of)
    spatial = surgery.spatial(layers, example) if example is not None else [1] * len(keep)
    folds = [m if nonnegative else None for m, nonnegative in zip(means, criteria.unsigned(layers))]
    return surgery.remove_units(layers, keep, spatial, means=folds if compensate else None), rescued


def obd_saliency(data: Data, *, batch_size: int = 128, seed: int = 0, teacher: Teacher = None, temperature: float = 4.0,
                 weight: float = 0.5) -> Callable[[nn.Module], list[torch.Tensor]]:
    """saliency(model) for zero_prune: criteria.saliencies over one pass of data, (x, y), in seeded
    random batches, of the loss fine-tuning minimises (training.distillation_loss, distilling from
    teacher: None, a model, or its logits for every example of data), with model in eval mode.
    On LeNet-300-100 at 98.5% zeros it ranks better than magnitude (README, the frontier)."""
    losses = batch_losses(data, batch_size, seed, teacher, temperature, weight)

    def saliency(model):
        mode = model.training
        model.eval()
        try:
            return criteria.saliencies(model, losses(model))
        finally:
            model.train(mode)
    return saliency


def unit_saliency(data: Data, *, batch_size: int = 128, seed: int = 0, teacher: Teacher = None,
                  temperature: float = 4.0, weight: float = 0.5) -> Callable:
    """A criterion for activation_prune: criterion(layers, pixel_mean) gives each unit's saliency
    (criteria.unit_saliencies) over one pass of data as obd_saliency measures it, the chain in the
    mode activation_prune measures in (eval)."""
    losses = batch_losses(data, batch_size, seed, teacher, temperature, weight)
    return lambda layers, pixel_mean: criteria.unit_saliencies(layers, pixel_mean, losses)


def batch_losses(data, batch_size, seed, teacher, temperature, weight):
    """losses(forward): the loss fine-tuning minimises (training.distillation_loss) of forward on
    each batch of one pass of data, (x, y), in seeded random batches; teacher: None, a model, or
    its logits for every example of data."""
    x, y = data
    if isinstance(teacher, nn.Module):
        teacher = training.logits(teacher, x)

    def losses(forward):
        gen = torch.Generator().manual_seed(seed)
        for idx in torch.randperm(len(x), generator=gen).to(x.device).split(batch_size):
            soft_targets = None if teacher is None else teacher.index_select(0, idx)
            yield training.distillation_loss(forward(x.index_select(0, idx)), y.index_select(0, idx), soft_targets,
                                             temperature=temperature, weight=weight)
    return losses


def group_lasso(model: nn.Module, strength: float, example: torch.Tensor, *,
                prune_inputs: bool = False) -> Callable[[], torch.Tensor]:
    """A penalty for training.train(): strength times the sum of every unit's weight norm, in and
    out together (every input pixel's too with prune_inputs), which drives the weights of the
    units the network can best spare toward zero as groups (group lasso: Yuan and Lin 2006; for
    neurons and channels, Wen et al. 2016). Trained with it, a network learns which units to do
    without, and a cut by contribution then removes those. example: one input of the network.
    A network with residual sums and concatenations: one group per channel of each channel space
    (channels.py), its rows in every layer that makes it and its columns in every one that reads it."""
    if blocks.has_blocks(model):
        raise chain.NotAChain(f"{type(model).__name__} holds attention: group_lasso groups the units of chains and "
                              "residual networks; remove a transformer's heads and feed-forward units with "
                              "activation_prune")
    try:
        layers = chain.layers(model)
    except chain.NotAChain as not_a_chain:  # residual sums, concatenations: a channel space is a group
        joined = joins(model, not_a_chain)
        if prune_inputs:
            raise chain.NotAChain(f"{not_a_chain}; prune_inputs is for a chain whose first weighted layer is an "
                                  "nn.Linear: drop it for a network with residual sums or concatenations") from None
        spaces, seen = channels.layout(joined, example)
        return lambda: strength * sum(norms.sum() for norms in channels.channel_norms(joined, spaces, seen))
    spatial = surgery.spatial(layers, example)

    def penalty():
        return strength * sum(norms.sum() for norms in criteria.unit_norms(layers, spatial, prune_inputs))
    return penalty


def shrink(model, widths, x, criterion, prune_inputs, spatial):
    """model cut to these unit widths (inputs first), keeping the strongest units by criterion."""
    layers = chain.layers(model)
    mode = model.training
    model.eval()
    strength, means, folds = criteria.scores(layers, x, criterion, spatial)
    model.train(mode)
    keep = [criteria.strongest(s, w) for s, w in zip(strength, widths[:-1])]
    inputs = (keep[0], means[0]) if prune_inputs else None
    return surgery.remove_units(layers, keep[1:], spatial, inputs, folds)  # after signed activations: their means
