"""Transformer blocks made smaller from the inside: whole attention heads, and the hidden units of
their feed-forward layers, removed without changing what any block takes or gives. The model's
width (its residual stream, its LayerNorms, its embedding) stays; so does every line of its
forward, whatever it does around the blocks. A head is its rows of the query, key and value
projections and its columns of the output projection (every nn.MultiheadAttention becomes an
attention.Attention first, with the same outputs); a feed-forward unit of nn.TransformerEncoderLayer
or nn.TransformerDecoderLayer is its row of linear1 and its column of linear2. Each is ranked by
what it passes on, measured over every token of the inputs given."""

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from pruning import surgery
from pruning.attention import Attention, from_multihead
from pruning.model import count_params, evaluating
from pruning.schedules import cubic_schedule

BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)  # those whose feed-forward units go


def has_blocks(model: nn.Module) -> bool:
    """Whether model holds attention or transformer blocks (what this module prunes)."""
    return any(isinstance(m, (nn.MultiheadAttention, Attention) + BLOCKS) for m in model.modules())


@dataclass
class Group:
    """Units removed together from one place: the heads of an attention (size: rows per head) or
    the hidden units of a feed-forward layer (size 1). first: the layers whose rows are the units;
    last: the layer whose columns are."""
    first: list[nn.Linear]
    last: nn.Linear
    size: int
    owner: nn.Module

    def count(self):
        return self.last.in_features // self.size

    def params_per_unit(self):
        return sum(layer.in_features + (layer.bias is not None) for layer in self.first) * self.size + \
            self.last.out_features * self.size


def with_attention(model):
    """model with every nn.MultiheadAttention replaced by an Attention of the same outputs."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, from_multihead(child))
        if isinstance(parent, nn.TransformerEncoder):
            parent.use_nested_tensor = False  # its fused path reads nn.MultiheadAttention's packed weights
    return model


def groups_of(model):
    """The model's groups: per Attention its heads, per transformer block its feed-forward units."""
    groups = []
    for m in model.modules():
        if isinstance(m, Attention):
            groups.append(Group([m.q_proj, m.k_proj, m.v_proj], m.out_proj, m.head_dim, m))
        elif isinstance(m, BLOCKS):
            groups.append(Group([m.linear1], m.linear2, 1, m))
    return groups


@torch.no_grad()
def strengths(model, groups, inputs, criterion, batch_size=500):
    """Per group, each unit's strength: the mean absolute value of what its last layer reads of it,
    over every token of inputs (a head's: summed over its features); with 'contribution', each
    feature's times the norm of its column in the last layer."""
    sums = [torch.zeros(g.last.in_features, dtype=torch.float64) for g in groups]
    counts = [0] * len(groups)

    def record(k):
        def hook(module, args):
            x = args[0].detach().double().abs().flatten(0, -2)
            sums[k] += x.sum(0).cpu()
            counts[k] += len(x)
        return hook

    handles = [g.last.register_forward_pre_hook(record(k)) for k, g in enumerate(groups)]
    try:
        with evaluating(model):
            for x in inputs.split(batch_size):
                model(x)
    finally:
        for h in handles:
            h.remove()
    result = []
    for g, total, n in zip(groups, sums, counts):
        mean = total / max(n, 1)
        if criterion == "contribution":
            mean = mean * g.last.weight.detach().double().cpu().norm(dim=0)
        result.append(mean.view(-1, g.size).sum(1).float())
    return result


def kept(group, fraction):
    return max(1, round(fraction * group.count()))


def params_at(model, groups, fraction):
    """The model's parameters with each group cut to `fraction` of its units, counted without building it."""
    return count_params(model) - sum((g.count() - kept(g, fraction)) * g.params_per_unit() for g in groups)


@torch.no_grad()
def remove(group, keep):
    """The group's layers with only the units whose index is in keep (a sorted index tensor): the
    first layers' rows and the last layer's columns (surgery.rebuilt)."""
    units = torch.zeros(group.count(), dtype=torch.bool)
    units[keep] = True
    device = group.last.weight.device
    kept = units.repeat_interleave(group.size).to(device)

    def every(n):
        return torch.ones(n, dtype=torch.bool, device=device)

    for layer in group.first:
        replace(group.owner, layer, surgery.rebuilt(layer, kept, every(layer.in_features), None))
    replace(group.owner, group.last, surgery.rebuilt(group.last, every(group.last.out_features), kept, None))
    if isinstance(group.owner, Attention):
        group.owner.num_heads = len(keep)


def replace(owner, old, new):
    for name, child in owner.named_children():
        if child is old:
            setattr(owner, name, new)
            return
    raise AssertionError(f"{old} is not a child of {type(owner).__name__}")


def shrink(model, inputs, target, criterion):
    """model (changed in place) with every group cut by one fraction, the largest at which it holds
    at most `target` parameters, the strongest units of each kept."""
    groups = groups_of(model)
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if params_at(model, groups, middle) <= target else (low, middle)
    for group, strength in zip(groups, strengths(model, groups, inputs, criterion)):
        keep = strength.argsort(descending=True, stable=True)[:kept(group, low)].sort().values
        remove(group, keep)
    return model


def prune_blocks(model, inputs, reduction, steps, finetune, criterion):
    """activation_prune on a model holding attention or transformer blocks: a copy of it, its heads
    and feed-forward units cut in `steps` steps until the fraction `reduction` of its parameters
    is gone (or each group is down to one unit), fine-tuned after each."""
    if callable(criterion):
        raise ValueError("a transformer's heads and feed-forward units are ranked by 'activation' or 'contribution'")
    pruned = with_attention(copy.deepcopy(model))
    original, mode = count_params(pruned), model.training
    if not groups_of(pruned):
        raise ValueError(f"{type(model).__name__} holds no attention heads or feed-forward units to remove")
    if reduction == 0:
        return pruned
    for r in cubic_schedule(reduction, steps):
        shrink(pruned, inputs, (1 - r) * original, criterion)
        if finetune:
            finetune(pruned)
    return pruned.train(mode)
