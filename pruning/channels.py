"""Which channels of a graph (graph.py) go together, and the graph made smaller: a channel space
is the set of channels that a layer makes and that every layer after it sees at the same place;
spaces joined by a sum are one (their channels go together from every branch that feeds it); a
concatenation's parts keep their own spaces at their offsets; a flatten repeats each channel over
its positions. The model's input and output spaces stay whole."""

import torch
import torch.nn as nn

from pruning import chain, surgery
from pruning.graph import Add, Cat, Graph
from pruning.model import evaluating


class Spaces:
    """Union-find over channel spaces, each of a width; a fixed space is never pruned."""

    def __init__(self):
        self.parent, self.width, self.fixed = [], [], []

    def new(self, width, fixed=False):
        self.parent.append(len(self.parent))
        self.width.append(width)
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, s):
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.fixed[a] = self.fixed[a] or self.fixed[b]


def layout(graph, example):
    """(spaces, per node its layout: a list of (space, positions) segments along its channels, each
    channel repeated over `positions` columns after a flatten), read from one run of example."""
    shapes = {}
    with evaluating([graph]), torch.no_grad():
        hooks = [layer.register_forward_hook(lambda m, i, out, k=k: shapes.__setitem__(k, out.shape))
                 for k, layer in enumerate(graph.layers)]
        try:
            graph(example[:2])
        finally:
            for h in hooks:
                h.remove()
    spaces = Spaces()
    seen = {-1: [(spaces.new(example.shape[1], fixed=True), 1)]}
    for k, (layer, reads) in enumerate(zip(graph.layers, graph.inputs)):
        before = [seen[i] for i in reads]
        if isinstance(layer, chain.WEIGHTED):
            seen[k] = [(spaces.new(shapes[k][1]), 1)]
        elif isinstance(layer, Cat):
            seen[k] = [segment for parts in before for segment in parts]
        elif isinstance(layer, Add):
            a = before[0]
            for b in before[1:]:  # a sum of any number of tensors, each laid out as the first
                if [p for _, p in a] != [p for _, p in b] or [spaces.width[spaces.find(s)] for s, _ in a] != \
                        [spaces.width[spaces.find(s)] for s, _ in b]:
                    raise chain.NotAChain(f"layer {k} sums tensors whose channels are laid out differently")
                for (s, _), (t, _) in zip(a, b):
                    spaces.union(s, t)
            seen[k] = a
        elif isinstance(layer, nn.Flatten):
            positions = int(torch.tensor(shapes[reads[0]][2:]).prod()) if len(shapes[reads[0]]) > 2 else 1
            seen[k] = [(s, p * positions) for s, p in before[0]]
        elif isinstance(layer, chain.PER_CHANNEL + chain.PASS_THROUGH) and not isinstance(
                layer, (chain.KeepInputs, chain.Normalize)):
            seen[k] = before[0]
        elif isinstance(layer, (chain.KeepInputs, chain.Normalize)):  # the input, reshaped: its channels stay
            seen[k] = [(spaces.new(shapes[k][1], fixed=True), 1)]
        elif isinstance(layer, chain.OUTPUTS):
            seen[k] = before[0]
            for s, _ in before[0]:
                spaces.fixed[spaces.find(s)] = True
        else:
            raise chain.NotAChain(f"layer {k} ({type(layer).__name__}) is not one this library can prune through")
    for s, _ in seen[len(graph.layers) - 1]:
        spaces.fixed[spaces.find(s)] = True
    return spaces, seen


def prunable_roots(spaces):
    """The root of every space whose channels may go."""
    return {spaces.find(s) for s in range(len(spaces.parent)) if not spaces.fixed[spaces.find(s)]}


def column_squares(layer, weight, segments, spaces):
    """(root space, each channel's squared norm over its columns) for every part of a weighted
    layer's input laid out as segments; weight: the layer's, detached or not."""
    columns = weight.transpose(0, 1).flatten(1) if isinstance(layer, nn.Conv2d) else weight.t()
    offset = 0
    for s, p in segments:
        width = spaces.width[spaces.find(s)]
        yield spaces.find(s), columns[offset:offset + width * p].reshape(width, -1).square().sum(1)
        offset += width * p


def mask(segments, keep, spaces):
    """The boolean mask of kept columns of a tensor of this layout."""
    return torch.cat([keep[spaces.find(s)].repeat_interleave(p) for s, p in segments])


# What to remove, and removing it ------------------------------------------------------------

@torch.no_grad()
def scores(graph, x, spaces, seen, criterion, batch_size=500):
    """Per prunable space, each channel's strength: the mean absolute value of every node output laid
    out as that space alone, summed; with 'contribution', times the norm of the channel's columns
    in every weighted layer that reads it."""
    strength = {r: torch.zeros(spaces.width[r], dtype=torch.float64) for r in prunable_roots(spaces)}
    with evaluating([graph]):
        for xb in x.split(batch_size):
            values = {-1: xb}
            for k, (layer, reads) in enumerate(zip(graph.layers, graph.inputs)):
                values[k] = layer(*(values[i] for i in reads))
                (s, p), *rest = seen[k]
                if not rest and p == 1 and spaces.find(s) in strength:
                    out = values[k].detach().double().abs().cpu()
                    strength[spaces.find(s)] += out.transpose(0, 1).flatten(1).sum(1) / (out[0, 0].numel() * len(x))
    if criterion == "contribution":
        squares = {r: torch.zeros_like(v) for r, v in strength.items()}
        for layer, reads in zip(graph.layers, graph.inputs):
            if isinstance(layer, chain.WEIGHTED):
                weight = layer.weight.detach().double().cpu()
                for root, part in column_squares(layer, weight, seen[reads[0]], spaces):
                    if root in squares:
                        squares[root] += part
        strength = {r: v * squares[r].sqrt() for r, v in strength.items()}
    return {r: v.float() for r, v in strength.items()}


@torch.no_grad()
def shrunk(graph, keep, spaces, seen):
    """A new Graph with only the kept channels of every space (keep: {root space: mask})."""
    every = {r: keep[r] if r in keep else torch.ones(spaces.width[r], dtype=torch.bool)
             for r in {spaces.find(s) for s in range(len(spaces.parent))}}
    layers = []
    for k, (layer, reads) in enumerate(zip(graph.layers, graph.inputs)):
        if isinstance(layer, chain.WEIGHTED):
            rows, columns = mask(seen[k], every, spaces), mask(seen[reads[0]], every, spaces)
            layers.append(surgery.rebuilt(layer, rows.to(layer.weight.device), columns.to(layer.weight.device), None))
        elif isinstance(layer, chain.PER_CHANNEL):
            device = next(layer.buffers(), torch.zeros(0)).device
            layers.append(surgery.fewer_channels(layer, mask(seen[k], every, spaces).to(device)))
        else:
            layers.append(layer)
    return Graph(layers, graph.inputs).train(graph.training)


def widths_for(spaces, fraction):
    """{root space: the channels it keeps} when every prunable space keeps `fraction` of them."""
    return {r: max(1, round(fraction * spaces.width[r])) for r in prunable_roots(spaces)}


def params_at(graph, spaces, seen, widths):
    """The parameters of the graph with these widths, counted without building it."""
    def width(segments):
        return sum(widths.get(spaces.find(s), spaces.width[spaces.find(s)]) * p for s, p in segments)
    total = 0
    for k, (layer, reads) in enumerate(zip(graph.layers, graph.inputs)):
        if isinstance(layer, chain.WEIGHTED):
            kernel = layer.weight[0, 0].numel()
            total += width(seen[k]) * width(seen[reads[0]]) * kernel + (width(seen[k]) if layer.bias is not None else 0)
        elif isinstance(layer, chain.PER_CHANNEL) and layer.affine:
            total += 2 * width(seen[k])
    return total


def shrink(graph, x, target, criterion):
    """graph cut to at most `target` parameters, every prunable space by one fraction, keeping the
    strongest channels of each, measured on x."""
    spaces, seen = layout(graph, x)
    low, high = 0.0, 1.0
    for _ in range(30):  # the largest fraction that fits
        middle = (low + high) / 2
        low, high = (middle, high) if params_at(graph, spaces, seen, widths_for(spaces, middle)) <= target \
            else (low, middle)
    widths = widths_for(spaces, low)
    strength = scores(graph, x, spaces, seen, criterion)
    keep = {r: torch.zeros(len(s), dtype=torch.bool).index_fill_(0, s.argsort(descending=True, stable=True)[
        :widths[r]], True) for r, s in strength.items()}
    return shrunk(graph, keep, spaces, seen)


def prunable(graph, example):
    """Refuse a graph none of whose channels can go (each space joined to the input or output)."""
    spaces, _ = layout(graph, example)
    if all(spaces.fixed[spaces.find(s)] for s in range(len(spaces.parent))):
        raise chain.NotAChain("no channel can be removed: every layer's channels are summed with the model's "
                              "input or output")


def channel_norms(graph, spaces, seen):
    """Per prunable space, each channel's weight norm: its rows (and biases) in every weighted layer
    that makes it and its columns in every one that reads it, together. Differentiable, with a zero
    gradient at a zero norm: group lasso's groups, one per channel a cut can remove."""
    roots, squares = prunable_roots(spaces), {}
    for k, (layer, reads) in enumerate(zip(graph.layers, graph.inputs)):
        if not isinstance(layer, chain.WEIGHTED):
            continue
        root = spaces.find(seen[k][0][0])
        if root in roots:
            rows = layer.weight.flatten(1).square().sum(1) + (0 if layer.bias is None else layer.bias.square())
            squares[root] = squares.get(root, 0) + rows
        for root, part in column_squares(layer, layer.weight, seen[reads[0]], spaces):
            if root in roots:
                squares[root] = squares.get(root, 0) + part
    norms = []
    for sq in squares.values():
        safe = torch.where(sq > 0, sq, torch.ones_like(sq))
        norms.append(torch.where(sq > 0, safe.sqrt(), torch.zeros_like(sq)))
    return norms
