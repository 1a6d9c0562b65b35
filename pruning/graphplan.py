"""A graph (residual sums, concatenations: graph.Graph) made ready to predict fast. Every
BatchNorm that only a convolution feeds is folded into it; each run of layers the kernel can run
that one path goes through (convolutions and max-poolings as lowering.py lowers them, a flatten,
fully connected layers, each maybe followed by a ReLU) becomes one kernel call, timed against
PyTorch on the inputs it gets there at the batch size asked; the sums, concatenations and
everything else stay PyTorch's. Where the kernel runs every node, the whole graph in one call
(wholegraph.py) is timed beside that plan, and the fastest of them and the model as given kept."""

import copy
import math

import torch
import torch.nn as nn

from pruning import graph, wholegraph
from pruning.kernels import NONE, RELU
from pruning.lowering import lowerable
from pruning.model import KeepInputs, Normalize
from pruning.plans import SKIPPED, as_written, fastest, flattens, plain, plan, sized, tune, ways_of

CALIBRATION = 2048  # the most inputs a graph's plan is timed on: a convolution's activations are tens of MB by
# then, past every cache, as at any larger batch; a ResNet's dense call on 10,000 takes seconds, timed many times


@torch.no_grad()
def folded(conv, norm):
    """conv then norm (a BatchNorm2d in eval mode) as one nn.Conv2d: the same outputs up to rounding,
    and the same zeros."""
    scale = (norm.running_var + norm.eps).rsqrt()
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    new = copy.deepcopy(conv)
    new.weight.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    new.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
    return new


def norms_folded(layers, inputs):
    """layers with every BatchNorm2d whose only input is a convolution that feeds nothing else folded
    into it (the convolution replaced, the BatchNorm by an nn.Identity)."""
    layers, count = list(layers), graph.consumers(inputs)
    for k, (layer, reads) in enumerate(zip(layers, inputs)):
        if type(layer) is nn.BatchNorm2d and layer.running_mean is not None and len(reads) == 1 and reads[0] >= 0 \
                and type(layers[reads[0]]) is nn.Conv2d and count[reads[0]] == 1:
            layers[reads[0]], layers[k] = folded(layers[reads[0]], layer), nn.Identity()
    return layers


def pools_made_faster(layers):
    """layers with each nn.AdaptiveMaxPool2d to one value a channel as graph.GlobalMax."""
    return [graph.GlobalMax() if as_written(layer, nn.AdaptiveMaxPool2d) and not layer.return_indices
            and layer.output_size in (1, (1, 1)) else layer for layer in layers]


def seen_on(layers, inputs, x):
    """The graph run on the batch x: (each node's output shape, one input's; each node's input)."""
    shapes, seen = {-1: tuple(x.shape[1:])}, {}

    def record(k):
        def hook(module, args, out):
            shapes[k], seen[k] = tuple(out.shape[1:]), args[0] if args else None  # a Tensor reads nothing
        return hook

    hooks = [layer.register_forward_hook(record(k)) for k, layer in enumerate(layers)]
    try:
        graph.Graph(layers, inputs).eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes, seen


def kernel_layer(layer, shape):
    """Whether the kernel runs layer on inputs of this shape: a lowerable convolution or pooling of
    images, or an nn.Linear of vectors."""
    return lowerable(layer) and len(shape) == 3 or as_written(layer, nn.Linear) and len(shape) == 1


def runs(layers, inputs, shapes):
    """The runs of nodes the kernel can take as one call: each starts at a kernel layer and goes on
    while the next node reads only the one before, which nothing else reads, and is a kernel layer, a
    ReLU, a flatten of the kernel's rows, or does nothing in eval mode."""
    count, found, k = graph.consumers(inputs), [], 0
    while k < len(layers):
        if not kernel_layer(layers[k], shapes[inputs[k][0]] if len(inputs[k]) == 1 else ()):
            k += 1
            continue
        members = [k]
        while k + 1 < len(layers) and inputs[k + 1] == [k] and count[k] == 1 and (
                kernel_layer(layers[k + 1], shapes[k]) or as_written(layers[k + 1], (nn.ReLU,) + SKIPPED)
                or flattens(layers[k + 1])):
            k += 1
            members.append(k)
        found.append(members)
        k += 1
    return found


class Segment(nn.Module):
    """A run of nodes as one kernel call (a plans.Prepared, which runs the layers in PyTorch for
    inputs it was not planned for), its output given the shape the run's last node gives."""

    def __init__(self, prepared, out_shape):
        super().__init__()
        self.prepared, self.out_shape = prepared, tuple(out_shape)

    def forward(self, x):
        return self.prepared(x).view(len(x), *self.out_shape)


def kernel_run(layers, members, shapes, in_shape, batch, packed):
    """The Prepared model running these nodes in the kernel, or None where one would store too much."""
    run, shape = [], in_shape
    for k in members:
        layer = layers[k]
        if lowerable(layer) and len(shape) == 3 or isinstance(layer, nn.Linear):
            stored = wholegraph.kernel_layer(layer, shape)
            if stored is None:
                return None
            run.append((stored, NONE))
        elif isinstance(layer, nn.ReLU):
            run[-1] = (run[-1][0], RELU)
        shape = shapes[k]
    pytorch = nn.Sequential(*(layers[k] for k in members))
    return plan([], run, ways_of(run, batch), None, in_shape, False, pytorch, packed, what="layers of a run")


class FastGraph(nn.Module):
    """A graph whose nodes are PyTorch's layers, joins and Segments; inputs it was not planned for
    (not fp32 on the CPU, of another shape (of another size, where its first node reshapes the
    input: `loose`), needing gradients, traced) go to the model as given."""

    def __init__(self, layers, inputs, shape, given, summary, loose=False):
        super().__init__()
        self.graph, self.shape, self.given, self.summary = graph.Graph(layers, inputs), tuple(shape), [given], summary
        self.inputs, self.loose = math.prod(shape), loose

    def forward(self, x):
        if not (plain(x) and x.dim() > 1
                and (sized(x, self.inputs) if self.loose else tuple(x.shape[1:]) == self.shape)):
            return self.given[0](x)
        return self.graph(x)


@torch.no_grad()
def prepared(given, joined, shape, batch, x, threads, pick=fastest):
    """given (a graph, joined: its graph.Graph) ready to predict: each run in the kernel where that
    is faster at this batch size on x, or the whole graph in one kernel call, whichever is faster,
    against given; None where neither is faster than given.
    pick(candidates, x): the one to keep, the incumbent first (plans.fastest: by timing them)."""
    layers = pools_made_faster(norms_folded(joined.layers, joined.inputs))
    shapes, seen = seen_on(layers, joined.inputs, x)  # each run timed on the inputs it gets
    packed, chosen = {}, []
    new_layers, new_inputs = list(layers), [list(r) for r in joined.inputs]
    for members in runs(layers, joined.inputs, shapes):
        first = members[0]
        kernel = kernel_run(layers, members, shapes, shapes[joined.inputs[first][0]], batch, packed)
        if kernel is None:
            continue
        h = seen[first].contiguous()
        tune(kernel, h, batch, threads)
        if pick([kernel.given[0], kernel], h) is kernel:
            chosen.append(members)
            new_layers[members[-1]] = Segment(kernel, shapes[members[-1]])
            new_inputs[members[-1]] = list(joined.inputs[first])
            for k in members[:-1]:
                new_layers[k], new_inputs[k] = nn.Identity(), [-1]  # not read: runs on the input, unused
    loose = [k for k, reads in enumerate(joined.inputs) if -1 in reads] == [0] and isinstance(
        layers[0], (Normalize, KeepInputs, nn.Flatten))  # the input reshaped first: any shape of its size
    candidates = [given]
    if chosen:
        weighted = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in layers)
        inside = sum(isinstance(layers[k], (nn.Linear, nn.Conv2d)) for members in chosen for k in members)
        summary = (f"a graph: {inside} of its {weighted} convolutions and fully connected layers in the kernel, in "
                   f"{len(chosen)} runs (BatchNorm folded into the convolution before it); its sums, concatenations "
                   "and other layers in PyTorch")
        candidates.append(FastGraph(new_layers, new_inputs, shape, given, summary, loose).eval())
    whole = wholegraph.one_call(given, layers, joined.inputs, shapes, shape, batch, loose, packed)
    if whole is not None:
        tune(whole, x, batch, threads)
        candidates.append(whole)
    best = pick(candidates, x) if len(candidates) > 1 else given
    return None if best is given else best
