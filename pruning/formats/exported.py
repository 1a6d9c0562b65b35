"""A torch.export file (an ExportedProgram, '.pt2': a model shipped without its class) read back as
layers this library prunes: each ATen call of its graph that a layer computes (linear, conv2d,
batch_norm, the element-wise activations, pooling, flatten, a sum, a concatenation) becomes that
layer, with the program's own weights, and the whole a graph.Graph, or an nn.Sequential where
each node reads the one before. Anything else in the program is refused in one line naming it."""

import zipfile

import torch
import torch.nn as nn

from pruning import graph
from pruning.files import UserError, shown

aten = torch.ops.aten
ACTIVATIONS = {aten.relu.default: nn.ReLU, aten.relu_.default: nn.ReLU, aten.sigmoid.default: nn.Sigmoid,
               aten.tanh.default: nn.Tanh, aten.silu.default: nn.SiLU, aten.silu_.default: nn.SiLU,
               aten.hardswish.default: nn.Hardswish, aten.hardsigmoid.default: nn.Hardsigmoid,
               aten.mish.default: nn.Mish, aten.selu.default: nn.SELU, aten.relu6.default: nn.ReLU6}
PASSING = (aten.dropout.default, aten.alias.default, aten.clone.default, aten.contiguous.default)


def argument(node, position, name, default):
    """The node's argument at position (after the tensor's) or by name, else default."""
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def pair(value):
    return tuple(value) * (2 if len(value) == 1 else 1) if isinstance(value, (list, tuple)) else (value, value)


def layer_of(node, tensor):
    """The module computing node's ATen call (tensor(n): the program's tensor that node n names),
    or None where the call passes its input through unchanged."""
    op = node.target
    if op == aten.linear.default:
        weight, bias = tensor(node.args[1]), tensor(argument(node, 2, "bias", None))
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    elif op in (aten.conv2d.default, aten.conv2d.padding):
        weight, bias = tensor(node.args[1]), tensor(argument(node, 2, "bias", None))
        padding = argument(node, 4, "padding", 0)
        layer = nn.Conv2d(weight.shape[1] * argument(node, 6, "groups", 1), weight.shape[0], tuple(weight.shape[2:]),
                          pair(argument(node, 3, "stride", 1)), padding if isinstance(padding, str) else pair(padding),
                          pair(argument(node, 5, "dilation", 1)), argument(node, 6, "groups", 1), bias=bias is not None)
    elif op in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
        weight = tensor(node.args[1])
        features = tensor(node.args[3]).shape[0]
        kind = nn.BatchNorm2d if node.args[0].meta["val"].dim() == 4 else nn.BatchNorm1d
        eps = node.args[7] if op == aten.batch_norm.default else node.args[6]
        layer = kind(features, eps=eps, affine=weight is not None)
        layer.running_mean.copy_(tensor(node.args[3]))
        layer.running_var.copy_(tensor(node.args[4]))
        if weight is not None:
            layer.weight.data.copy_(weight)
            layer.bias.data.copy_(tensor(node.args[2]))
        return layer
    elif op in ACTIVATIONS:
        return ACTIVATIONS[op]()
    elif op == aten.gelu.default:
        return nn.GELU(approximate=node.kwargs.get("approximate", "none"))
    elif op == aten.leaky_relu.default:
        return nn.LeakyReLU(argument(node, 1, "negative_slope", 0.01))
    elif op == aten.hardtanh.default:
        return nn.Hardtanh(argument(node, 1, "min_val", -1.0), argument(node, 2, "max_val", 1.0))
    elif op in (aten.max_pool2d.default, aten.avg_pool2d.default):
        kernel = pair(node.args[1])
        stride, padding = pair(argument(node, 2, "stride", []) or kernel), pair(argument(node, 3, "padding", 0))
        if op == aten.max_pool2d.default and (pair(argument(node, 4, "dilation", 1)) != (1, 1)
                                              or argument(node, 5, "ceil_mode", False)):
            raise ValueError("a max pooling with dilation or ceil_mode, which this library does not store")
        return (nn.MaxPool2d if op == aten.max_pool2d.default else nn.AvgPool2d)(kernel, stride, padding)
    elif op == aten.adaptive_avg_pool2d.default:
        return nn.AdaptiveAvgPool2d(tuple(node.args[1]))
    elif op in (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        shape, out = node.args[0].meta["val"].shape, node.meta["val"].shape
        if tuple(out) == tuple(shape):
            return None
        if len(out) != 2 or out[0] != shape[0]:
            raise ValueError(f"{op} reshapes to {tuple(out)}: only a flatten of each input to one row is rebuilt")
        return nn.Flatten() if len(shape) > 2 else None
    elif op in (aten.add.Tensor, aten.add_.Tensor):
        tensors = all(isinstance(a, torch.fx.Node) for a in node.args)
        if len(node.args) != 2 or not tensors or node.kwargs.get("alpha", 1) != 1:
            raise ValueError("a sum of anything but two tensors")
        return graph.Add()
    elif op in (aten.cat.default, aten.concat.default):
        if argument(node, 1, "dim", 0) not in (1, -node.meta["val"].dim() + 1):
            raise ValueError("a concatenation along another dimension than the channels")
        return graph.Cat()
    elif op in (aten.log_softmax.int, aten._log_softmax.default):
        return nn.LogSoftmax(dim=node.args[1])
    elif op in (aten.softmax.int, aten._softmax.default):
        return nn.Softmax(dim=node.args[1])
    elif op in PASSING:
        return None
    else:
        raise ValueError(f"it computes {op}, which this library does not rebuild as a layer")
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def from_program(program):
    """program (an ExportedProgram) as a graph.Graph of modules, or an nn.Sequential where it is a
    chain, with the shape of one input as exported (`exported_input_shape`); ValueError says what
    it holds that no layer computes."""
    signature = program.graph_signature
    named = {**program.state_dict, **program.constants}
    params = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
              **signature.inputs_to_lifted_tensor_constants}
    nodes = {}  # fx node: index of the layer that computes it (-1: the model's input)
    layers, reads = [], []

    def tensor(node):
        if node is None:
            return None
        if not isinstance(node, torch.fx.Node) or node.name not in params:
            raise ValueError(f"{node} is computed, not a weight of the program")
        return named[params[node.name]].detach()

    for node in program.graph_module.graph.nodes:
        if node.op == "placeholder":
            if node.name in params:
                continue
            if -1 in nodes.values():
                raise ValueError("its forward takes more than one input")
            nodes[node] = -1
            shape = tuple(int(size) for size in node.meta["val"].shape[1:])  # as exported, its batch left out
        elif node.op == "call_function" and node.target.__name__ == "getitem":
            if node.args[1] != 0 or node.args[0] not in nodes:
                raise ValueError("it uses more than the first result of a call")
            nodes[node] = nodes[node.args[0]]
        elif node.op == "call_function":
            layer = layer_of(node, tensor)
            inputs = node.args[0] if node.target in (aten.cat.default, aten.concat.default) else \
                node.args[:2] if isinstance(layer, graph.Add) else node.args[:1]
            if any(i not in nodes for i in inputs):
                raise ValueError(f"its {node.target} reads what is not a layer's output")
            if layer is None:
                nodes[node] = nodes[inputs[0]]
                continue
            layers.append(layer)
            reads.append([nodes[i] for i in inputs])
            nodes[node] = len(layers) - 1
        elif node.op == "output":
            outputs = node.args[0]
            if len(outputs) != 1 or nodes.get(outputs[0]) != len(layers) - 1:
                raise ValueError("its output is not its last layer's, one tensor")
    if not layers:
        raise ValueError("it computes no layer")
    model = nn.Sequential(*layers) if all(r == [k - 1] for k, r in enumerate(reads)) else graph.Graph(layers, reads)
    model.exported_input_shape = shape
    return model.eval()


def is_exported(path):
    """Whether the zip file at path is a torch.export archive (it names its archive format)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("archive_format") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_exported(path):
    """The model a torch.export file holds, rebuilt as layers (from_program), in eval mode."""
    try:
        program = torch.export.load(path)
    except Exception as e:
        raise UserError(f"{shown(path)} cannot be loaded as a torch.export file ({type(e).__name__})") from None
    try:
        model = from_program(program)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{shown(path)}: the program cannot be rebuilt as layers: {e}") from None
    return model
