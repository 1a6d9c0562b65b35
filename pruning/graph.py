"""Networks with residual sums and concatenations: the graph a forward runs (a chain with joins),
read from the forward by torch.fx as layers, each with the nodes it reads; which channels go
together, and how every layer shrinks, is channels.py's."""

import operator

import torch
import torch.fx
import torch.nn as nn

from pruning import chain, handwritten
from pruning.attention import SelfAttention


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


def consumers(inputs):
    """How many nodes read each node (the last, the model's output, counted once more)."""
    count = [0] * len(inputs)
    for reads in inputs:
        for i in reads:
            if i >= 0:
                count[i] += 1
    count[-1] += 1
    return count


class Tensor(nn.Module):
    """A learned tensor the forward uses as it is (a position embedding): a node that reads nothing."""

    def __init__(self, value):
        super().__init__()
        self.value = value if isinstance(value, nn.Parameter) else nn.Parameter(value)

    def forward(self):
        return self.value


class GlobalMax(nn.Module):
    """The largest value of each channel over its whole image: nn.AdaptiveMaxPool2d(1), 5 to 7 times
    faster in PyTorch (x.amax; a ResNet-style network's (32, 32, 14, 14) activations on an AMD EPYC)."""

    def forward(self, x):
        return x.amax((-2, -1), keepdim=True)


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


def network(model):
    """model as what a file describes: its chain as an nn.Sequential, else its Graph."""
    try:
        return chain.sequential(model)
    except chain.NotAChain:
        return of(model)


def layers_of(net):
    return list(net.layers) if isinstance(net, Graph) else chain.layers(net)
