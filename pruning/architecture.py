"""A network's architecture as plain data (a list of layer descriptions, JSON-able) and back:
what a model file records so that it rebuilds itself. Every claim is checked, and the whole
model's size bounded, before anything is built."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning import chain, graph
from pruning.attention import Attention, SelfAttention
from pruning.model import MAX_PARAMS, KeepInputs, Normalize

MAX_LAYERS, MAX_DIM = 256, 1 << 24


class BadArchitecture(ValueError):
    """The description is not one of a network this project can build."""


def describe(model):
    """The list of layer descriptions of a chain model (as chain.layers gives it), or of a
    graph.Graph's layers, each with the nodes it reads ("reads", -1 the model's input)."""
    if isinstance(model, graph.Graph):
        return [{**layer_description(m), "reads": reads} for m, reads in zip(model.layers, model.inputs)]
    return [layer_description(m) for m in chain.layers(model)]


def layer_description(m):
    kind = next((name for name, t in TYPES.items() if type(m) is t), None) or next(
        (name for name, t in TYPES.items() if isinstance(m, t)), type(m).__name__)  # quantized: a subclass
    if isinstance(m, Normalize):
        return {"type": kind, "mean": m.mean, "std": m.std, "shape": list(m.shape)}
    if isinstance(m, KeepInputs):
        return {"type": kind, "inputs": len(m.indices), "size": m.size}
    if isinstance(m, nn.Linear):
        return {"type": kind, "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise BadArchitecture(f"{m}: grouped convolutions are not stored")
        return {"type": kind, "in": m.in_channels, "out": m.out_channels, "kernel": list(m.kernel_size),
                "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "bias": m.bias is not None,
                **({"padding_mode": m.padding_mode} if m.padding_mode != "zeros" else {})}
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return {"type": kind, "kernel": m.kernel_size, "stride": m.stride, "padding": m.padding}
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return {"type": kind, "output": m.output_size}
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return {"type": kind, "features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track": m.track_running_stats}
    if isinstance(m, chain.DROPOUTS):
        return {"type": kind, "p": m.p}
    if isinstance(m, nn.TransformerEncoderLayer):
        return encoder_layer(m)
    if isinstance(m, SelfAttention):
        return {"type": kind, "width": m.embed_dim, "heads": m.num_heads, "head_dim": m.head_dim,
                "bias": m.out_proj.bias is not None, "causal": m.causal, "packed": m.packed}
    if isinstance(m, nn.LayerNorm):
        return {"type": kind, "shape": list(m.normalized_shape), "eps": m.eps, "affine": m.elementwise_affine,
                "bias": m.bias is not None}
    if isinstance(m, graph.Tensor):
        return {"type": kind, "shape": list(m.value.shape)}
    if isinstance(m, graph.Mean):
        return {"type": kind, "over": m.dim, "keepdim": m.keepdim}
    if isinstance(m, graph.Reshape):
        return {"type": kind, "shape": list(m.shape)}
    if isinstance(m, graph.Permute):
        return {"type": kind, "order": list(m.order)}
    if isinstance(m, graph.Token):
        return {"type": kind, "index": m.index}
    if kind in ARGUMENTS:
        return {"type": kind, **{field: getattr(m, attribute) for field, attribute in ARGUMENTS[kind].items()}}
    if isinstance(m, nn.Flatten):
        if (m.start_dim, m.end_dim) != (1, -1):
            raise BadArchitecture(f"{m}: only Flatten(1, -1) is stored")
        return {"type": kind}
    if isinstance(m, chain.ELEMENTWISE + graph.JOINS + (nn.Identity,)):
        return {"type": kind}
    raise BadArchitecture(f"{kind} layers are not stored")


def encoder_layer(m):
    """An nn.TransformerEncoderLayer as data: its attention (PyTorch's, or an Attention with fewer
    heads), feed-forward width, activation, norms' place and dropout."""
    attention = m.self_attn
    activation = {F.relu: "relu", F.gelu: "gelu"}.get(m.activation) or (
        "relu" if type(m.activation) is nn.ReLU else "gelu" if type(m.activation) is nn.GELU
        and m.activation.approximate == "none" else None)
    packed = isinstance(attention, nn.MultiheadAttention)
    if activation is None or not isinstance(attention, (nn.MultiheadAttention, Attention)) or packed and (
            not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn):
        raise BadArchitecture("an nn.TransformerEncoderLayer with another activation than ReLU or GELU, or "
                              "attention of another kind, is not stored")
    return {"type": "TransformerEncoderLayer", "width": m.linear1.in_features, "heads": attention.num_heads,
            "head_dim": attention.head_dim, "hidden": m.linear1.out_features, "activation": activation,
            "norm_first": m.norm_first, "eps": m.norm1.eps, "bias": m.linear1.bias is not None,
            "batch_first": attention.batch_first, "p": m.dropout.p, "packed": packed}


def build_encoder_layer(d):
    """The nn.TransformerEncoderLayer of a description, its weights not set (what loads sets them):
    made on the meta device, its attention replaced where it has fewer heads, then given memory."""
    if d["packed"] and d["heads"] * d["head_dim"] != d["width"]:
        raise ValueError("PyTorch's attention has heads x head_dim features, its width")
    device = torch.get_default_device()
    with torch.device("meta"):
        layer = nn.TransformerEncoderLayer(d["width"], d["heads"] if d["packed"] else 1, d["hidden"], d["p"],
                                           d["activation"], d["eps"], d["batch_first"], d["norm_first"],
                                           bias=d["bias"])
        if not d["packed"]:
            layer.self_attn = Attention(d["width"], heads=d["heads"], head_dim=d["head_dim"], bias=d["bias"],
                                        dropout=d["p"], batch_first=d["batch_first"])
    return layer.to_empty(device=device)


def count(description):
    """The parameters and buffers' elements the description claims, computed without building it."""
    total = 0
    for d in description:
        kind = d["type"]
        if kind == "Linear":
            total += d["in"] * d["out"] + d["out"] * d["bias"]
        elif kind == "Conv2d":
            total += d["in"] * d["out"] * math.prod(d["kernel"]) + d["out"] * d["bias"]
        elif kind.startswith("BatchNorm"):
            total += 4 * d["features"]
        elif kind == "KeepInputs":
            total += d["inputs"]
        elif kind == "TransformerEncoderLayer":
            width, inner, hidden, bias = d["width"], d["heads"] * d["head_dim"], d["hidden"], d["bias"]
            total += 4 * width * inner + 3 * inner * bias + width * bias + 2 * width * hidden + hidden * bias \
                + width * bias + 2 * width * (1 + bias)
        elif kind == "SelfAttention":
            inner = d["heads"] * d["head_dim"]
            total += 4 * d["width"] * inner + (3 * inner + d["width"]) * d["bias"]
        elif kind == "LayerNorm":
            total += math.prod(d["shape"]) * d["affine"] * (1 + d["bias"])
        elif kind == "Tensor":
            total += math.prod(d["shape"])
    return total


FIELDS = {  # per layer type, the fields its description must hold (beside "type")
    "Normalize": {"mean", "std", "shape"}, "KeepInputs": {"inputs", "size"}, "Linear": {"in", "out", "bias"},
    "Conv2d": {"in", "out", "kernel", "stride", "padding", "dilation", "bias"},
    "MaxPool2d": {"kernel", "stride", "padding"}, "AvgPool2d": {"kernel", "stride", "padding"},
    "AdaptiveAvgPool2d": {"output"}, "AdaptiveMaxPool2d": {"output"},
    "BatchNorm1d": {"features", "eps", "momentum", "affine", "track"},
    "BatchNorm2d": {"features", "eps", "momentum", "affine", "track"},
    "Flatten": set(), "Identity": set(), "Add": set(), "Cat": set(),
    "TransformerEncoderLayer": {"width", "heads", "head_dim", "hidden", "activation", "norm_first", "eps", "bias",
                                "batch_first", "p", "packed"},
    "SelfAttention": {"width", "heads", "head_dim", "bias", "causal", "packed"},
    "LayerNorm": {"shape", "eps", "affine", "bias"}, "Tensor": {"shape"}, "Mean": {"over", "keepdim"},
    "Reshape": {"shape"}, "Permute": {"order"}, "Token": {"index"},
    **{t.__name__: {"p"} for t in chain.DROPOUTS},
    **{t.__name__: set() for t in chain.ELEMENTWISE},
}
ARGUMENTS = {  # per activation with settings, its fields and the module's attributes they hold
    "LeakyReLU": {"slope": "negative_slope"}, "ELU": {"alpha": "alpha"}, "CELU": {"alpha": "alpha"},
    "Softplus": {"beta": "beta", "threshold": "threshold"}, "Hardtanh": {"low": "min_val", "high": "max_val"},
    "LogSoftmax": {"dim": "dim"}, "Softmax": {"dim": "dim"},
}
FIELDS.update({kind: set(fields) for kind, fields in ARGUMENTS.items()})
OPTIONAL = {"Conv2d": {"padding_mode"}}  # fields added since the first files: a file without them is read as before
SIZES = ("in", "out", "inputs", "size", "features", "kernel", "shape", "output", "width", "heads", "head_dim",
         "hidden")
OFFSETS = ("stride", "padding", "dilation")


def brief(value, limit=60):
    """value as an error line may quote it: one line, cut to a readable length."""
    try:
        text = repr(value).replace("\n", " ")
    except RecursionError:
        return "a value nested too deeply"
    return text if len(text) <= limit else text[:limit] + "..."


def number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def field_ok(key, value):
    """Whether one field of a layer's description holds what it may."""
    values = list(value) if isinstance(value, (list, tuple)) and key in SIZES + OFFSETS else [value]
    if key in SIZES:
        return 0 < len(values) <= 4 and all(type(v) is int and 0 < v <= MAX_DIM for v in values)
    if key == "padding" and isinstance(value, str):
        return value in ("same", "valid")
    if key in OFFSETS:
        return value is None and key == "stride" or 0 < len(values) <= 4 and all(
            type(v) is int and 0 <= v <= MAX_DIM for v in values)
    if key == "padding_mode":
        return value in ("zeros", "reflect", "replicate", "circular")
    if key == "dim":
        return type(value) is int and value in (1, -1)
    if key in ("slope", "alpha", "beta", "threshold", "low", "high"):
        return number(value)
    if key in ("bias", "affine", "track", "norm_first", "batch_first", "packed", "keepdim", "causal"):
        return type(value) is bool
    if key == "order":
        return isinstance(value, list) and 0 < len(value) <= 4 and sorted(value) == list(range(len(value))) and all(
            type(v) is int for v in value)
    if key == "index":
        return type(value) is int and -MAX_DIM <= value < MAX_DIM
    if key == "over":
        return type(value) is int and value != 0 and -4 <= value <= 4
    if key == "activation":
        return value in ("relu", "gelu")
    if key == "mean":
        return number(value)
    if key in ("std", "eps"):
        return number(value) and value > 0
    if key == "momentum":
        return value is None or number(value) and 0 <= value <= 1
    if key == "p":
        return number(value) and 0 <= value <= 1
    return False


def check(description, max_params=MAX_PARAMS):
    """Raise BadArchitecture unless description is a list of layers this project builds, of at
    most MAX_PARAMS elements: every field of every layer checked for its type and range, and the
    size counted from them, before anything is allocated."""
    if not isinstance(description, list) or not 0 < len(description) <= MAX_LAYERS:
        raise BadArchitecture(f"the architecture is not a list of 1 to {MAX_LAYERS} layers")
    for i, d in enumerate(description):
        if not isinstance(d, dict) or not isinstance(d.get("type"), str) or d["type"] not in BUILDERS:
            raise BadArchitecture(f"layer {i} is of no type this project builds")
        if not FIELDS[d["type"]] <= d.keys() - {"type"} <= FIELDS[d["type"]] | OPTIONAL.get(d["type"], set()) | {
                "reads"}:
            fields = ", ".join(sorted(FIELDS[d["type"]])) or "none"
            raise BadArchitecture(f"layer {i} ({d['type']}) does not hold its fields ({fields}) and no others")
        for key, value in d.items():
            if key not in ("type", "reads") and not field_ok(key, value):
                raise BadArchitecture(f"layer {i} ({d['type']}) claims an impossible {key}: {brief(value)}")
    check_inputs(description)
    elements = count(description)
    if elements > max_params:
        raise BadArchitecture(f"it claims {elements:,} parameters, more than the {max_params:,} allowed "
                              "(load(path, max_params=...) allows more)")
    if not any(d["type"] in ("Linear", "Conv2d") for d in description):
        raise BadArchitecture("it has no layer with weights")


def check_inputs(description):
    """A graph's description: every layer reads earlier nodes (-1 the model's input), a join two or
    more, any other layer one; a chain's: none says what it reads."""
    given = ["reads" in d for d in description]
    if not any(given):
        if any(d["type"] in ("Add", "Cat") for d in description):
            raise BadArchitecture("it joins tensors but does not say which")
        return
    if not all(given):
        raise BadArchitecture("some of its layers say which nodes they read and some do not")
    for k, d in enumerate(description):
        reads, joins = d["reads"], d["type"] in ("Add", "Cat")
        wanted = range(2, 17) if joins else (0,) if d["type"] == "Tensor" else (1,)
        if not (isinstance(reads, list) and len(reads) in wanted
                and all(type(i) is int and -1 <= i < k for i in reads)):
            raise BadArchitecture(f"layer {k} ({d['type']}) reads impossible nodes: {brief(reads)}")


BUILDERS = {
    "Normalize": lambda d: Normalize(d["mean"], d["std"], d["shape"]),
    "KeepInputs": lambda d: KeepInputs(torch.zeros(d["inputs"], dtype=torch.long), d["size"]),
    "Linear": lambda d: nn.Linear(d["in"], d["out"], bias=d["bias"]),
    "Conv2d": lambda d: nn.Conv2d(d["in"], d["out"], d["kernel"], d["stride"], d["padding"], d["dilation"],
                                  bias=d["bias"], padding_mode=d.get("padding_mode", "zeros")),
    "MaxPool2d": lambda d: nn.MaxPool2d(d["kernel"], d["stride"], d["padding"]),
    "AvgPool2d": lambda d: nn.AvgPool2d(d["kernel"], d["stride"], d["padding"]),
    "AdaptiveAvgPool2d": lambda d: nn.AdaptiveAvgPool2d(d["output"]),
    "AdaptiveMaxPool2d": lambda d: nn.AdaptiveMaxPool2d(d["output"]),
    "BatchNorm1d": lambda d: nn.BatchNorm1d(d["features"], d["eps"], d["momentum"], d["affine"], d["track"]),
    "BatchNorm2d": lambda d: nn.BatchNorm2d(d["features"], d["eps"], d["momentum"], d["affine"], d["track"]),
    "Flatten": lambda d: nn.Flatten(),
    "Identity": lambda d: nn.Identity(),
    "Add": lambda d: graph.Add(),
    "Cat": lambda d: graph.Cat(),
    "TransformerEncoderLayer": build_encoder_layer,
    "SelfAttention": lambda d: SelfAttention(d["width"], heads=d["heads"], head_dim=d["head_dim"], bias=d["bias"],
                                             causal=d["causal"], packed=d["packed"]),
    "LayerNorm": lambda d: nn.LayerNorm(d["shape"], d["eps"], d["affine"], d["bias"]),
    "Tensor": lambda d: graph.Tensor(torch.zeros(d["shape"])),
    "Mean": lambda d: graph.Mean(d["over"], d["keepdim"]),
    "Reshape": lambda d: graph.Reshape(d["shape"]),
    "Permute": lambda d: graph.Permute(d["order"]),
    "Token": lambda d: graph.Token(d["index"]),
    **{t.__name__: lambda d, t=t: t(d["p"]) for t in chain.DROPOUTS},
    **{t.__name__: lambda d, t=t: t() for t in chain.ELEMENTWISE},
    **{kind: lambda d, kind=kind, fields=fields: getattr(nn, kind)(**{a: d[f] for f, a in fields.items()})
       for kind, fields in ARGUMENTS.items()},
}


TYPES = {name: getattr(nn, name, None) or {"Normalize": Normalize, "KeepInputs": KeepInputs, "Add": graph.Add,
                                            "Cat": graph.Cat, "Tensor": graph.Tensor, "Mean": graph.Mean,
                                            "Reshape": graph.Reshape, "Permute": graph.Permute,
                                            "Token": graph.Token, "SelfAttention": SelfAttention}[name]
         for name in BUILDERS}


def build(description, device=None, max_params=MAX_PARAMS):
    """The nn.Sequential (or graph.Graph) a checked description describes; device 'meta' allocates
    nothing, and runs one input of the shape the model records through it, to check that its layers
    fit together and that a call needs no more than MAX_ACTIVATIONS values an input."""
    check(description, max_params)
    try:
        with torch.device(device or "cpu"):
            layers = [BUILDERS[d["type"]](d) for d in description]
            model = graph.Graph(layers, [d["reads"] for d in description]) if "reads" in description[0] \
                else nn.Sequential(*layers)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise BadArchitecture(f"a layer cannot be built ({type(e).__name__}: {e})") from None
    if device == "meta":
        check_shapes(model)
    return model


MAX_ACTIVATIONS = 1 << 27  # values every layer's output holds for one input: 512 MB of fp32


def check_shapes(meta_model):
    """Run one input of the shape the model records (none recorded: nothing to run) through the model
    built on the meta device, which computes shapes and allocates nothing."""
    shape = chain.input_shape(graph.layers_of(meta_model))
    if shape is None:
        return
    values = 0

    def count(module, args, output):
        nonlocal values
        values += output.numel() if isinstance(output, torch.Tensor) else 0
        if values > MAX_ACTIVATIONS:
            raise BadArchitecture(f"one input would need more than {MAX_ACTIVATIONS:,} values in its layers' "
                                  "outputs")

    modules = meta_model.layers if isinstance(meta_model, graph.Graph) else meta_model
    hooks = [m.register_forward_hook(count) for m in modules]
    try:
        with torch.no_grad():
            meta_model.eval()(torch.empty(1, *shape, device="meta"))
    except BadArchitecture:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise BadArchitecture(f"its layers do not fit together on an input of shape {shape} "
                              f"({type(e).__name__}: {reason[:120]})") from None
    finally:
        for h in hooks:
            h.remove()


# What any file's model must be -------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def file_limit(max_params=MAX_PARAMS):
    """The largest model file of at most max_params parameters: fp64 values with int32 indices."""
    return 12 * max_params + (1 << 20)


def check_model(model):
    """Refuse a model whose numbers cannot be right: non-finite weights or buffers (BatchNorm's
    statistics), a normalisation by zero, pixel indices out of range."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ValueError("it holds weights that are not finite numbers")
    if not all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point()):
        raise ValueError("it holds statistics that are not finite numbers")
    for m in model.modules():
        if isinstance(m, Normalize) and not (math.isfinite(m.mean) and math.isfinite(m.std) and m.std > 0):
            raise ValueError(f"its input normalisation (mean {m.mean}, std {m.std}) is not a finite one")
        if isinstance(m, KeepInputs) and len(m.indices) and (m.indices.min() < 0 or m.indices.max() >= m.size):
            raise ValueError("its input pixels lie outside the image")
