"""What must go together: a network as the chain of layers its forward runs one after another,
and the groups that shrink together when a neuron or channel goes. Anything that is not such
a chain (a residual sum, a concatenation, an unknown layer) is refused before any change, in one
line naming it; general graphs are Torch-Pruning's dependency graph's work."""

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from pruning.model import KeepInputs, Normalize

WEIGHTED = (nn.Linear, nn.Conv2d)
PER_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d)
PASS_THROUGH = (nn.ReLU, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                nn.Identity, Normalize, KeepInputs)
KNOWN = WEIGHTED + PER_CHANNEL + PASS_THROUGH + (nn.Flatten,)
FUNCTIONS = {F.relu: nn.ReLU, torch.relu: nn.ReLU, "relu": nn.ReLU, torch.flatten: nn.Flatten, "flatten": nn.Flatten,
             F.dropout: nn.Dropout}


class NotAChain(ValueError):
    """The network is not a chain of layers this library can prune; the message names the layer."""


def layers(model):
    """The modules model's forward runs one after another, as a list; shares model's modules."""
    if isinstance(model, nn.Sequential):
        out = []
        for name, module in model.named_children():
            out += layers(module) if isinstance(module, nn.Sequential) else [checked(module, name)]
        return out
    if isinstance(model, KNOWN):
        return [model]
    return traced(model)


def checked(module, name):
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise NotAChain(f"layer {name} is a grouped convolution, whose channels go together in groups; "
                        "this library prunes ordinary convolutions only")
    if not isinstance(module, KNOWN):
        raise NotAChain(f"layer {name} ({type(module).__name__}) is not one this library can prune through; "
                        f"it handles {', '.join(t.__name__ for t in KNOWN if t not in (Normalize, KeepInputs))}")
    return module


class LayerTracer(torch.fx.Tracer):
    """Traces a forward down to the layers this library knows, each one call."""

    def is_leaf_module(self, module, name):
        return isinstance(module, KNOWN) or super().is_leaf_module(module, name)


def traced(model):
    """The chain of a module subclass, read from its forward by torch.fx."""
    try:
        graph = LayerTracer().trace(model)
    except Exception as e:
        raise NotAChain(f"{type(model).__name__}'s forward cannot be traced as a chain of layers "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    chain, last, sizes = [], None, set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if last is not None:
                raise NotAChain(f"{type(model).__name__}'s forward takes more than one input")
            last = node
            continue
        if node.op == "output":
            if node.args[0] is not last:
                raise NotAChain(f"{type(model).__name__}'s output is not its last layer's")
            break
        if node.op == "call_method" and node.target == "size":  # x.view(x.size(0), -1)
            sizes.add(node)
            continue
        inputs = [a for a in node.all_input_nodes if a not in sizes]
        if inputs != [last]:
            what = node.target if node.op == "call_module" else getattr(node.target, "__name__", node.target)
            raise NotAChain(f"{what} in {type(model).__name__} does not take only the previous layer's output "
                            "(a residual sum, a concatenation or a branch): not a chain")
        chain.append(as_module(model, node))
        last = node
    return chain


def as_module(model, node):
    if node.op == "call_module":
        return checked(model.get_submodule(node.target), node.target)
    target = node.target
    if target in FUNCTIONS and node.op in ("call_function", "call_method"):
        kind = FUNCTIONS[target]
        if kind is nn.Flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start != 1:
                raise NotAChain(f"flatten from dimension {start} in {type(model).__name__}: only flatten(x, 1) "
                                "keeps the batch")
        if kind is nn.Dropout:
            return nn.Dropout(node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5))
        return kind()
    if target in (F.max_pool2d, F.avg_pool2d):
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
        stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
        return (nn.MaxPool2d if target is F.max_pool2d else nn.AvgPool2d)(kernel, stride or None, padding)
    if node.op == "call_method" and target == "view" and len(node.args) == 3 and node.args[2] == -1:
        return nn.Flatten()
    name = getattr(target, "__name__", target)
    if target in (operator.add, torch.add, torch.cat, "add", "__add__"):
        raise NotAChain(f"{name} in {type(model).__name__}: a residual sum or concatenation is not a chain")
    raise NotAChain(f"{name} in {type(model).__name__} is not a layer this library can prune through")


def sequential(model):
    """model as an nn.Sequential of its chain of layers (the same module objects)."""
    return model if isinstance(model, nn.Sequential) and all(not isinstance(m, nn.Sequential) for m in model) \
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
        for k in between:
            if not isinstance(chain[k], PER_CHANNEL + PASS_THROUGH + (nn.Flatten,)) or isinstance(chain[k], KeepInputs):
                raise NotAChain(f"layer {k} ({type(chain[k]).__name__}) stands between two pruned layers")
        out.append((i, between, j))
    return out
