"""Transformer blocks made smaller from the inside: whole attention heads, and the hidden units of
their feed-forward layers, removed without changing what any block takes or gives. The model's
width (its residual stream, its LayerNorms, its embedding) stays; so does every line of its
forward, whatever it does around the blocks. A head is its rows of the query, key and value
projections and its columns of the output projection (every nn.MultiheadAttention becomes an
attention.Attention first, with the same outputs, and attention written by hand a SelfAttention:
handwritten.py); a feed-forward unit of nn.TransformerEncoderLayer or nn.TransformerDecoderLayer
is its row of linear1 and its column of linear2, and so is one of a feed-forward layer written as
a chain (nn.Linear, element-wise layers, nn.Linear: an nn.Sequential or an MLP module's forward).
Each is ranked by what it passes on, measured over every token of the inputs given."""

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from pruning import chain, handwritten, surgery
from pruning.attention import Attention, SelfAttention, from_multihead
from pruning.model import count_params, evaluating
from pruning.schedules import cubic_schedule

BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)  # those whose feed-forward units go
ATTENTION = (nn.MultiheadAttention, Attention, SelfAttention)


def has_blocks(model: nn.Module) -> bool:
    """Whether model holds attention or transformer blocks (what this module prunes)."""
    return any(isinstance(m, ATTENTION + BLOCKS) or handwritten.calls_attention(m)
               for m in model.modules())


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
        rows = sum((layer.in_features + (layer.bias is not None)) * layer.out_features for layer in self.first)
        return rows // self.last.in_features * self.size + self.last.out_features * self.size


def with_attention(model):
    """model with every nn.MultiheadAttention replaced by an Attention of the same outputs, and
    every attention written by hand by a SelfAttention."""
    handwritten.replaced(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, from_multihead(child))
        if isinstance(parent, nn.TransformerEncoder):
            parent.use_nested_tensor = False  # its fused path reads nn.MultiheadAttention's packed weights
    return model


def groups_of(model):
    """The model's groups: per Attention its heads, per transformer block and per feed-forward
    layer written as a chain its hidden units."""
    groups, inside = [], set()
    for m in model.modules():
        if isinstance(m, Attention):
            groups.append(Group([m.q_proj, m.k_proj, m.v_proj], m.out_proj, m.head_dim, m))
        elif isinstance(m, SelfAttention):
            groups.append(Group(m.projections(), m.out_proj, m.head_dim, m))
        elif isinstance(m, BLOCKS):
            groups.append(Group([m.linear1], m.linear2, 1, m))
        if isinstance(m, ATTENTION + BLOCKS):
            inside.update(id(layer) for layer in m.modules())
    for m in model.modules():
        if id(m) not in inside:
            for first, last in feed_forward(chained(m)):
                if id(first) not in inside:
                    groups.append(Group([first], last, 1, m))
                    inside.add(id(first))
    return groups


ELEMENTWISE = "element-wise"  # a function or tensor method of a chain, as chain.ACTIVATIONS reads them


def chained(owner):
    """The children owner's forward runs one after another (ELEMENTWISE for an activation
    function between them), or [] where its forward is no such chain."""
    if isinstance(owner, nn.Sequential):
        return list(owner)
    if type(owner).__module__.startswith("torch.") or not any(True for _ in owner.children()):
        return []
    try:
        first, nodes = chain.walked(owner, "chain")
    except chain.NotAChain:
        return []
    steps, last = [], first
    for node, reads in nodes:
        if reads != [last]:
            return []
        if node.op == "call_module" and "." not in node.target:
            steps.append(owner.get_submodule(node.target))
        else:
            steps.append(ELEMENTWISE if node.op != "call_module" and node.target in chain.ACTIVATIONS else None)
        last = node
    return steps


def feed_forward(steps):
    """Each (first, last) nn.Linear pair of a chain's steps with only element-wise layers between:
    first's outputs are read by last alone."""
    for k, first in enumerate(steps):
        if not isinstance(first, nn.Linear):
            continue
        j = k + 1
        while j < len(steps) and (steps[j] is ELEMENTWISE or isinstance(steps[j], chain.ELEMENTWISE + chain.DROPOUTS)):
            j += 1
        if j < len(steps) and isinstance(steps[j], nn.Linear) and steps[j].in_features == first.out_features:
            yield first, steps[j]


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

    for layer in group.first:  # a packed projection's rows: the query's, the key's, the value's
        rows = kept.repeat(layer.out_features // len(kept))
        replace(group.owner, layer, surgery.rebuilt(layer, rows, every(layer.in_features), None))
    replace(group.owner, group.last, surgery.rebuilt(group.last, every(group.last.out_features), kept, None))
    if isinstance(group.owner, (Attention, SelfAttention)):
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
