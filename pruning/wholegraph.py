"""A graph (graph.Graph, its BatchNorms folded) as one call of the kernel, where every node is one
of these: a layer the kernel runs (a convolution or max-pooling as lowering.py lowers it, an
average or a maximum over each channel's whole image, a fully connected layer), a ReLU after one,
a residual sum (added into the layer computed last, before its activation), a concatenation of
channels (the layers that make it writing side by side in one buffer), a flatten or a layer that
does nothing in eval mode, and the input normalisation first (folded into how the kernel reads
its input). Each node's outputs stay in one of the kernel's buffers, in its tiles, until the last
layer that reads them: no pass over the data between layers, where graphplan.py's runs each go
back to PyTorch's layout for the joins between them."""

import math

import torch.nn as nn

from pruning import graph
from pruning.kernels import NONE, RELU
from pruning.lowering import MAX_STORED, Lowered, lowerable
from pruning.model import Normalize
from pruning.packing import KernelLayers
from pruning.plans import SKIPPED, Prepared, as_written, flattens, ways_of

INPUT = -1  # the node whose outputs are the model's input (the kernel's buffer 0)


class Node:
    """A layer of the kernel's call: `layer` (an nn.Linear or a Lowered), its activation, the node
    whose outputs it reads, the node whose outputs it adds to its own (None: none), and the
    concatenation it writes into, at which row (None: a buffer of its own)."""

    def __init__(self, layer, reads):
        self.layer, self.activation, self.reads, self.adds, self.into = layer, NONE, reads, None, None


def kernel_layer(layer, shape):
    """The layer as the kernel runs it on inputs of `shape`, or None where it cannot."""
    if lowerable(layer) and len(shape) == 3:
        lowered = Lowered(layer, shape)
    elif as_written(layer, nn.Linear) and len(shape) == 1:
        return layer
    elif len(shape) == 3 and whole_image(layer):
        pool = nn.AvgPool2d if isinstance(layer, nn.AdaptiveAvgPool2d) else nn.MaxPool2d
        lowered = Lowered(pool(shape[1:]), shape)
    else:
        return None
    return lowered if lowered.entries() <= MAX_STORED else None


def whole_image(layer):
    """Whether layer pools each channel's whole image to one value (its average or its maximum)."""
    if isinstance(layer, graph.GlobalMax):
        return True
    return (as_written(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and layer.output_size in (1, (1, 1))
            and not getattr(layer, "return_indices", False))


def passes(layer):
    """Whether layer hands its input on as the kernel holds it: nothing in eval mode, or a flatten
    keeping the batch."""
    return as_written(layer, SKIPPED) or flattens(layer)


def nodes_of(layers, inputs, shapes):
    """(the kernel's layers, each a Node, by the graph node it computes; the input normalisation
    (shift, scale)), or None where some node is none of those the module's docstring names."""
    count, owner, nodes = graph.consumers(inputs), {INPUT: INPUT}, {}
    shift, scale = 0.0, 1.0
    through = {}  # a node handing on another's outputs: the node it reads

    def only_here(k):
        """Whether node k's outputs (and every node's that hands them on) are read once, by one node."""
        while True:
            if count[k] != 1:
                return False
            if k not in through:
                return True
            k = through[k]

    for k, (layer, reads) in enumerate(zip(layers, inputs)):
        if k == 0 and reads == [INPUT] and as_written(layer, Normalize):
            shift, scale, owner[k] = layer.mean, layer.std, INPUT
        elif len(reads) == 1 and passes(layer):
            owner[k], through[k] = owner[reads[0]], reads[0]
        elif len(reads) == 1 and as_written(layer, nn.ReLU):
            made = owner[reads[0]]
            if made not in nodes or nodes[made].activation != NONE or not only_here(reads[0]):
                return None
            nodes[made].activation, owner[k], through[k] = RELU, made, reads[0]
        elif isinstance(layer, graph.Add) and len(reads) == 2 and shapes[reads[0]] == shapes[reads[1]]:
            later, earlier = sorted(reads, key=lambda r: owner[r], reverse=True)
            made = owner[later]
            if made not in nodes or nodes[made].adds is not None or nodes[made].into is not None \
                    or nodes[made].activation != NONE or not only_here(later):
                return None
            nodes[made].adds, owner[k], through[k] = owner[earlier], made, later
        elif isinstance(layer, graph.Cat) and all(len(shapes[r]) == len(shapes[reads[0]]) for r in reads):
            row = 0
            for r in reads:
                made = owner[r]
                if made not in nodes or nodes[made].into is not None or not only_here(r) or \
                        shapes[r][1:] != shapes[reads[0]][1:]:
                    return None
                nodes[made].into, row = (k, row), row + math.prod(shapes[r])
            owner[k] = k
        elif len(reads) == 1 and (made := kernel_layer(layer, shapes[reads[0]])) is not None:
            nodes[k], owner[k] = Node(made, owner[reads[0]]), k
        else:
            return None
    last = owner[len(layers) - 1]
    if not nodes or last != max(nodes) or nodes[last].into is not None or len(shapes[len(layers) - 1]) != 1 \
            or nodes[min(nodes)].reads != INPUT:
        return None
    return nodes, (shift, scale)


def routes_of(nodes):
    """Each kernel layer's (buffer it reads, buffer it writes, the row there its outputs start at,
    buffer it adds to its own or -1): a buffer taken when a node's outputs are made and given back
    after the last layer that reads them, never one the layer itself reads (kernels.FIELDS)."""
    order = sorted(nodes)
    last_read = {}
    for j, k in enumerate(order):
        for read in (nodes[k].reads, nodes[k].adds):
            if read is not None:
                last_read[read] = j
    buffer, free, routes, made = {INPUT: 0}, [], [], 1

    def take():
        nonlocal made
        if free:
            return free.pop()
        made += 1
        return made - 1

    for j, k in enumerate(order):
        node = nodes[k]
        holder, row = node.into if node.into is not None else (k, 0)
        if holder not in buffer:
            buffer[holder] = take()
        routes.append((buffer[node.reads], buffer[holder], row,
                       -1 if node.adds is None else buffer[node.adds]))
        for read in {node.reads, node.adds} - {None}:
            if last_read[read] == j:
                free.append(buffer[read])
    return routes


def one_call(given, layers, inputs, shapes, shape, batch, loose, packed):
    """A Prepared model running the whole graph in one call of the kernel, or None where it cannot
    (nodes_of)."""
    found = nodes_of(layers, inputs, shapes)
    if found is None:
        return None
    nodes, (shift, scale) = found
    run = [(nodes[k].layer, nodes[k].activation) for k in sorted(nodes)]
    ways = ways_of(run, batch)
    kernel = KernelLayers(run, [w in ("rows", "strips") for w in ways], math.prod(shape), None, shift, scale,
                          packed=packed, routes=routes_of(nodes))
    return Prepared(nn.Sequential(), [kernel], shape, loose, given, ways,
                    what="every layer of the graph, in one kernel call")
