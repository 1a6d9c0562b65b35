"""What must go together: a network as the chain of layers its forward runs one after another,
and the groups that shrink together when a neuron or channel goes. Element-wise activations of
every kind, dropout, pooling and every flatten spelling pass through; (log-)softmax may end the
chain. Anything that is not such a chain (a residual sum, a concatenation, an unknown layer) is
refused before any change, in one line naming it."""

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from pruning.attention import SelfAttention
from pruning.model import KeepInputs, Normalize

WEIGHTED = (nn.Linear, nn.Conv2d)
PER_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d)
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.LeakyReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ReLU6, nn.ELU, nn.Hardswish,
               nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.CELU, nn.SELU, nn.Softsign, nn.Tanhshrink,
               nn.LogSigmoid)  # each maps every unit to itself alone: a removed unit passes through unchanged
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
OUTPUTS = (nn.LogSoftmax, nn.Softmax)  # mix the units they see: only after the last weighted layer
PASS_THROUGH = ELEMENTWISE + DROPOUTS + (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                                         nn.Identity, Normalize, KeepInputs)
KNOWN = WEIGHTED + PER_CHANNEL + PASS_THROUGH + OUTPUTS + (nn.Flatten,)
ACTIVATIONS = {  # functions and tensor methods, as the module each one is
    F.relu: nn.ReLU, torch.relu: nn.ReLU, "relu": nn.ReLU, F.gelu: nn.GELU, F.silu: nn.SiLU, torch.tanh: nn.Tanh,
    F.tanh: nn.Tanh, "tanh": nn.Tanh, torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid,
    F.relu6: nn.ReLU6, F.hardswish: nn.Hardswish, F.hardsigmoid: nn.Hardsigmoid, F.mish: nn.Mish,
    F.selu: nn.SELU, torch.selu: nn.SELU, F.softsign: nn.Softsign, F.tanhshrink: nn.Tanhshrink,
    F.logsigmoid: nn.LogSigmoid,
}
WITH_ARGUMENTS = {  # function or method: (module, [(argument name, position after the tensor's 0, default)])
    F.leaky_relu: (nn.LeakyReLU, [("negative_slope", 1, 0.01)]), F.elu: (nn.ELU, [("alpha", 1, 1.0)]),
    F.celu: (nn.CELU, [("alpha", 1, 1.0)]), F.softplus: (nn.Softplus, [("beta", 1, 1.0), ("threshold", 2, 20.0)]),
    F.hardtanh: (nn.Hardtanh, [("min_val", 1, -1.0), ("max_val", 2, 1.0)]),
    F.log_softmax: (nn.LogSoftmax, [("dim", 1, None)]), torch.log_softmax: (nn.LogSoftmax, [("dim", 1, None)]),
    "log_softmax": (nn.LogSoftmax, [("dim", 1, None)]), F.softmax: (nn.Softmax, [("dim", 1, None)]),
    torch.softmax: (nn.Softmax, [("dim", 1, None)]), "softmax": (nn.Softmax, [("dim", 1, None)]),
    F.dropout: (nn.Dropout, [("p", 1, 0.5)]), F.dropout1d: (nn.Dropout1d, [("p", 1, 0.5)]),
    F.dropout2d: (nn.Dropout2d, [("p", 1, 0.5)]), F.alpha_dropout: (nn.AlphaDropout, [("p", 1, 0.5)]),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, [("output_size", 1, None)]),
    F.adaptive_max_pool2d: (nn.AdaptiveMaxPool2d, [("output_size", 1, None)]),
}
FLATTENS = (torch.flatten, "flatten", "view", "reshape", torch.reshape)
SIZES = ("size", "shape", "dim")  # x.size(0), x.shape[0]: a flatten's computed sizes


class NotAChain(ValueError):
    """The network is not a chain of layers this library can prune; the message names the layer."""


def layers(model):
    """The modules model's forward runs one after another, as a list; shares model's modules.
    Sequentials and modules of the user's own nested anywhere are read as their forward runs."""
    if isinstance(model, nn.Sequential):
        out = []
        for name, module in model._modules.items():  # named_children() would skip a module used twice
            own = isinstance(module, nn.Sequential) or not type(module).__module__.startswith("torch.")
            out += layers(module) if own and not isinstance(module, KNOWN) else [checked(module, name)]
        return out
    if isinstance(model, KNOWN):
        return [checked(model, type(model).__name__)]
    return traced(model)


def checked(module, name):
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise NotAChain(f"layer {name} is a grouped convolution, whose channels go together in groups; "
                        "this library prunes ordinary convolutions only")
    if not isinstance(module, KNOWN):
        raise NotAChain(f"layer {name} ({type(module).__name__}) is not one this library can prune through; it "
                        "handles Linear, Conv2d, BatchNorm, element-wise activations, dropout, pooling, Flatten "
                        "and LogSoftmax or Softmax at the end")
    return module


class LayerTracer(torch.fx.Tracer):
    """Traces a forward down to the layers this library knows, each one call."""

    def is_leaf_module(self, module, name):
        return isinstance(module, KNOWN + (SelfAttention,)) or super().is_leaf_module(module, name)


def traced(model):
    """The chain of a module subclass, read from its forward by torch.fx."""
    (last, nodes), chain = walked(model, "chain"), []
    for node, reads in nodes:
        if reads != [last]:
            what = node.target if node.op == "call_module" else getattr(node.target, "__name__", node.target)
            raise NotAChain(f"{what} in {type(model).__name__} does not take only the previous layer's output "
                            "(a residual sum, a concatenation or a branch): not a chain")
        chain.append(as_module(model, node))
        last = node
    return chain


def walked(model, kind):
    """model's forward traced by torch.fx: (its input's node, [(each later node, the nodes it
    reads)]), the nodes that only compute sizes left out, the output checked to be the last node's.
    kind ("chain", "graph") names what is read, in the messages."""
    try:
        graph = LayerTracer().trace(model)
    except Exception as e:
        raise NotAChain(f"{type(model).__name__}'s forward cannot be traced as a {kind} of layers "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    first, nodes, sizes = None, [], set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if first is not None:
                raise NotAChain(f"{type(model).__name__}'s forward takes more than one input")
            first = node
        elif node.op == "output":
            if node.args[0] is not (nodes[-1][0] if nodes else first):
                raise NotAChain(f"{type(model).__name__}'s output is not its last layer's")
            break
        elif is_size(node, sizes):  # x.view(x.size(0), -1), x.reshape(x.shape[0], -1)
            sizes.add(node)
        else:
            nodes.append((node, [a for a in node.all_input_nodes if a not in sizes]))
    return first, nodes


def is_size(node, sizes):
    """Whether node computes a size from a tensor's shape (which a flatten may use), not values."""
    if node.op == "call_method" and node.target in SIZES:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in SIZES:
        return True
    arguments = node.all_input_nodes
    return node.op == "call_function" and node.target in (operator.getitem, operator.mul, operator.floordiv) \
        and bool(arguments) and all(a in sizes for a in arguments)


def argument(node, name, position, default):
    """A call's argument by keyword, else by position among the arguments after the tensor."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else default


def as_module(model, node):
    if node.op == "call_module":
        return checked(model.get_submodule(node.target), node.target)
    target, where = node.target, type(model).__name__
    if node.op not in ("call_function", "call_method"):
        raise NotAChain(f"{target} in {where} is not a layer this library can prune through")
    if target in ACTIVATIONS:
        return ACTIVATIONS[target]()
    if target in WITH_ARGUMENTS:
        kind, arguments = WITH_ARGUMENTS[target]
        values = {name: argument(node, name, i, default) for name, i, default in arguments}
        if kind in (nn.LogSoftmax, nn.Softmax) and values["dim"] not in (1, -1):
            raise NotAChain(f"{getattr(target, '__name__', target)} over dimension {values['dim']} in {where}: "
                            "only over the classes (dim=1)")
        if kind in DROPOUTS:
            return kind(values["p"])
        return kind(**values)
    if target in FLATTENS:
        return flatten(node, where)
    if target in (F.max_pool2d, F.avg_pool2d):
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
        stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
        return (nn.MaxPool2d if target is F.max_pool2d else nn.AvgPool2d)(kernel, stride or None, padding)
    name = getattr(target, "__name__", target)
    if target in (operator.add, torch.add, torch.cat, "add", "__add__"):
        raise NotAChain(f"{name} in {where}: a residual sum or concatenation is not a chain")
    raise NotAChain(f"{name} in {where} is not a layer this library can prune through")


def flatten(node, where):
    """nn.Flatten for a call that keeps the batch and flattens the rest: flatten(x, 1),
    x.flatten(1), x.view(-1, n), x.view(x.size(0), -1), x.reshape(len, n), ..."""
    if node.target in (torch.flatten, "flatten"):
        start = argument(node, "start_dim", 1, 0)
        if start != 1 or argument(node, "end_dim", 2, -1) != -1:
            raise NotAChain(f"flatten from dimension {start} in {where}: only flatten(x, 1) keeps the batch")
        return nn.Flatten()
    shape = shape_argument(node)
    if len(shape) != 2 or not (shape[0] == -1 or isinstance(shape[0], torch.fx.Node)):
        raise NotAChain(f"{node.target} to the shape {tuple(shape)} in {where}: only a flatten that keeps the "
                        "batch, (-1, n) or (batch, -1), is a layer")
    return nn.Flatten()


def shape_argument(node):
    """The shape a view or reshape node asks for: x.view(a, b) or x.view((a, b))."""
    return tuple(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
        else tuple(node.args[1:])


def input_shape(layers):
    """The shape of one input as the chain records it: its input normalisation's, its kept pixels'
    image, or its first nn.Linear's inputs (after a flatten); None where it records none."""
    for m in layers:
        if isinstance(m, Normalize):
            return tuple(m.shape)
        if isinstance(m, KeepInputs):
            return (m.size,)
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if not isinstance(m, (nn.Flatten, nn.Identity) + DROPOUTS):
            return None
    return None


def sequential(model):
    """model as an nn.Sequential of its chain of layers (the same module objects)."""
    return model if isinstance(model, nn.Sequential) and all(isinstance(m, KNOWN) for m in model) \
        else nn.Sequential(*layers(model))


def groups(chain):
    """Per weighted layer, what shrinks with its outputs: (index of the layer, indices of the
    layers between it and the next weighted layer, index of the next weighted layer or None)."""
    weighted = [i for i, m in enumerate(chain) if isinstance(m, WEIGHTED)]
    if not weighted:
        raise NotAChain("the network has no nn.Linear or nn.Conv2d layer to prune")
    out = []
    for i, j in zip(weighted, weighted[1:] + [None]):
        between = list(range(i + 1, j if j is not None else len(chain)))
        allowed = PER_CHANNEL + PASS_THROUGH + (nn.Flatten,) + (OUTPUTS if j is None else ())
        for k in between:
            if not isinstance(chain[k], allowed) or isinstance(chain[k], KeepInputs):
                where = "between two pruned layers" if j is not None else "after the last weighted layer"
                raise NotAChain(f"layer {k} ({type(chain[k]).__name__}) stands {where}")
        out.append((i, between, j))
    return out
