"""Networks with residual sums and concatenations: the graph a forward runs (a chain with joins),
which channels must go together, and how every layer shrinks. A channel space is the set of
channels that a layer makes and that every layer after it sees at the same place; spaces joined
by a sum are one (their channels go together from every branch that feeds it); a concatenation's
parts keep their own spaces at their offsets; a flatten repeats each channel over its positions.
The model's input and output spaces stay whole."""

import operator

import torch
import torch.fx
import torch.nn as nn

from pruning import chain, handwritten, surgery
from pruning.attention import SelfAttention
from pruning.model import evaluating


class Add(nn.Module):
    """The sum of its inputs: a residual connection."""

    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Cat(nn.Module):
    """Its inputs side by side along the channels."""

    def forward(self, *xs):
        return torch.cat(xs, 1)


class Graph(nn.Module):
    """layers run in order, each on the outputs of the nodes in its `inputs` (-1: the model's
    input); the last layer's output is the model's."""

    def __init__(self, layers, inputs):
        super().__init__()
        self.layers, self.inputs = nn.ModuleList(layers), [list(i) for i in inputs]

    def forward(self, x):
        values = {-1: x}
        for k, (layer, reads) in enumerate(zip(self.layers, self.inputs)):
            values[k] = layer(*(values[i] for i in reads))
        return values[len(self.layers) - 1]


class Tensor(nn.Module):
    """A learned tensor the forward uses as it is (a position embedding): a node that reads nothing."""

    def __init__(self, value):
        super().__init__()
        self.value = value if isinstance(value, nn.Parameter) else nn.Parameter(value)

    def forward(self):
        return self.value


class Mean(nn.Module):
    """The mean over one dimension (a transformer's tokens)."""

    def __init__(self, dim, keepdim=False):
        super().__init__()
        self.dim, self.keepdim = dim, keepdim

    def forward(self, x):
        return x.mean(self.dim, keepdim=self.keepdim)


class Reshape(nn.Module):
    """Each input (the batch kept) seen in `shape`: an image as its rows, tokens."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(-1, *self.shape)


class Permute(nn.Module):
    """The first len(order) dimensions in another order, the rest as they are (a transformer's
    tokens first, the batch second)."""

    def __init__(self, order):
        super().__init__()
        self.order = tuple(order)

    def forward(self, x):
        return x.permute(*self.order, *range(len(self.order), x.dim()))


class Token(nn.Module):
    """One token of each sequence, (batch, tokens, features) -> (batch, features): a class token."""

    def __init__(self, index):
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[:, self.index]


JOINS = (Add, Cat)
BLOCKS = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.LayerNorm, SelfAttention)  # a graph's, not a chain's
MEANS = (torch.mean, "mean")
RESHAPES = ("view", "reshape", torch.reshape)
SUMS = (operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__")
CATS = (torch.cat, torch.concat, torch.concatenate)


def of(model):
    """model as a Graph of its own layers (the same module objects, but for attention written by
    hand: a SelfAttention computing the same, handwritten.py), read from its forward."""
    if isinstance(model, Graph):
        return model
    model = handwritten.with_self_attention(model)
    first, nodes = chain.walked(model, "graph")
    index, layers, inputs = {first: -1}, [], []
    for node, reads in nodes:
        if node.op == "get_attr":
            layer = learned(model, node.target)
        elif node.target in SUMS + CATS:
            layer = join(node, type(model).__name__)
        else:
            if len(reads) != 1:
                raise chain.NotAChain(f"{node.target} in {type(model).__name__} reads several tensors")
            layer = block(model, node)
        for part in (list(layer.layers) + ([layer.norm] if layer.norm is not None else [])
                     if isinstance(layer, nn.TransformerEncoder) else [layer]):
            layers.append(part)
            inputs.append([index[a] for a in reads])
            reads = [node]
            index[node] = len(layers) - 1
    return Graph(layers, inputs)


def learned(model, name):
    """The Tensor node of a parameter the forward reads by name."""
    try:
        return Tensor(model.get_parameter(name))
    except AttributeError:
        raise chain.NotAChain(f"{name} in {type(model).__name__} is a tensor that is not a parameter") from None


def block(model, node):
    """The layer a node of a transformer's forward is: a block, a LayerNorm, a mean over tokens, a
    reshape keeping the batch; else a chain's layer. An nn.TransformerEncoder is given whole (its
    layers, then its norm, each reading the one before: what it runs on one tensor)."""
    if node.op == "call_module" and isinstance(model.get_submodule(node.target), BLOCKS):
        return model.get_submodule(node.target)
    if node.target in MEANS and node.op != "call_module":
        dim = chain.argument(node, "dim", 1, None)
        if type(dim) is not int or dim == 0:
            raise chain.NotAChain(f"a mean over {dim} in {type(model).__name__}: only over one dimension "
                                  "after the batch")
        return Mean(dim, bool(chain.argument(node, "keepdim", 2, False)))
    if node.target in RESHAPES and node.op != "call_module":
        shape = chain.shape_argument(node)
        if len(shape) > 2 and (shape[0] == -1 or isinstance(shape[0], torch.fx.Node)) and all(
                type(n) is int and n > 0 for n in shape[1:]):
            return Reshape(shape[1:])
    if node.target in ("permute", torch.permute, "transpose", torch.transpose) and node.op != "call_module":
        return Permute(order(node, type(model).__name__))
    if node.target is operator.getitem and isinstance(node.args[1], tuple) and len(node.args[1]) == 2 \
            and node.args[1][0] == slice(None) and type(node.args[1][1]) is int:
        return Token(node.args[1][1])
    return chain.as_module(model, node)


def order(node, where):
    """The dimensions' order of a permute or transpose node (a transpose of up to 4 dimensions)."""
    given = node.args[1:] if len(node.args) > 1 else tuple(node.kwargs.values())
    if node.target in ("permute", torch.permute):
        dims = tuple(given[0]) if len(given) == 1 and isinstance(given[0], (tuple, list)) else tuple(given)
        if sorted(dims) == list(range(len(dims))):
            return dims
    elif len(given) == 2 and all(type(d) is int and 0 <= d < 4 for d in given):
        dims = list(range(max(given) + 1))
        dims[given[0]], dims[given[1]] = dims[given[1]], dims[given[0]]
        return tuple(dims)
    raise chain.NotAChain(f"{node.target} to {given} in {where}: only a permute or a transpose of counted dimensions")


def join(node, where):
    reads = node.all_input_nodes
    if node.target in SUMS:
        if len(reads) != 2 or len(node.args) != 2 or node.kwargs:
            raise chain.NotAChain(f"a sum in {where} that is not of two tensors: only residual sums are joins")
        return Add()
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim != 1:
        raise chain.NotAChain(f"a concatenation along dimension {dim} in {where}: only along the channels (dim=1)")
    return Cat()


# Which channels go together -----------------------------------------------------------------

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


def mask(segments, keep, spaces):
    """The boolean mask of kept columns of a tensor of this layout."""
    return torch.cat([keep[spaces.find(s)].repeat_interleave(p) for s, p in segments])


# What to remove, and removing it ------------------------------------------------------------

@torch.no_grad()
def scores(graph, x, spaces, seen, criterion, batch_size=500):
    """Per prunable space, each channel's strength: the mean absolute value of every node output laid
    out as that space alone, summed; with 'contribution', times the norm of the channel's columns
    in every weighted layer that reads it."""
    roots = {spaces.find(s) for s in range(len(spaces.parent)) if not spaces.fixed[spaces.find(s)]}
    strength = {r: torch.zeros(spaces.width[r], dtype=torch.float64) for r in roots}
    with evaluating([graph]):
        for xb in x.split(batch_size):
            values = {-1: xb}
            for k, (layer, reads) in enumerate(zip(graph.layers, graph.inputs)):
                values[k] = layer(*(values[i] for i in reads))
                (s, p), *rest = seen[k]
                if not rest and p == 1 and spaces.find(s) in roots:
                    out = values[k].detach().double().abs().cpu()
                    strength[spaces.find(s)] += out.transpose(0, 1).flatten(1).sum(1) / (out[0, 0].numel() * len(x))
    if criterion == "contribution":
        squares = {r: torch.zeros_like(v) for r, v in strength.items()}
        for layer, reads in zip(graph.layers, graph.inputs):
            if isinstance(layer, chain.WEIGHTED):
                weight = layer.weight.detach().double().cpu()
                columns = weight.transpose(0, 1).flatten(1) if isinstance(layer, nn.Conv2d) else weight.t()
                offset = 0
                for s, p in seen[reads[0]]:
                    width = spaces.width[spaces.find(s)]
                    part = columns[offset:offset + width * p].reshape(width, -1)
                    if spaces.find(s) in squares:
                        squares[spaces.find(s)] += part.square().sum(1)
                    offset += width * p
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
    roots = {spaces.find(s) for s in range(len(spaces.parent))}
    return {r: max(1, round(fraction * spaces.width[r])) for r in roots if not spaces.fixed[r]}


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


def network(model):
    """model as what a file describes: its chain as an nn.Sequential, else its Graph."""
    try:
        return chain.sequential(model)
    except chain.NotAChain:
        return of(model)


def layers_of(net):
    return list(net.layers) if isinstance(net, Graph) else chain.layers(net)
