"""What one_shot prunes: each weight matrix a forward multiplies, with the rows of inputs it
multiplies it by. An nn.Linear or nn.Conv2d is one unit, its inputs seen by a hook on the layer
(a convolution's unfolded into one row per output position). nn.MultiheadAttention multiplies
its projections without calling them as layers, so it is four units, each seen by a hook on the
attention: the query, key and value projections (rows of the packed in_proj_weight, or
q_proj_weight, k_proj_weight and v_proj_weight), which read the query, key and value; and the
output projection, which reads the heads' outputs: the attention computed again with the output
projection as the identity."""

import contextlib
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYERS = (nn.Linear, nn.Conv2d)  # the layers one_shot reconstructs, besides attention
PARTS = ("query", "key", "value", "output")  # nn.MultiheadAttention's projections, in the order it runs them


class Unit:
    """One weight matrix one_shot prunes: a layer's weight (part None), or one of PARTS of an
    nn.MultiheadAttention."""

    def __init__(self, module, part=None):
        self.module, self.part = module, part

    def owner(self):
        """(the module holding the unit's weights, the parameter's name, the rows of it that are the
        unit's: None for all)."""
        m, part = self.module, self.part
        if part is None:
            return m, "weight", None
        if part == "output":
            return m.out_proj, "weight", None
        if m._qkv_same_embed_dim:
            k, width = PARTS.index(part), m.embed_dim
            return m, "in_proj_weight", slice(k * width, (k + 1) * width)
        return m, f"{part[0]}_proj_weight", None

    def tensor(self):
        """(the parameter holding the unit's weights, the rows of it that are the unit's: None for all)."""
        module, name, rows = self.owner()
        return getattr(module, name), rows

    def matrix(self):
        """The weights as the forward multiplies them, rows x columns (a convolution's flattened)."""
        weight, rows = self.tensor()
        weight = weight.detach()
        return (weight if rows is None else weight[rows]).flatten(1)

    def forced(self):
        """A mask of the weights a pruning mask holds at zero (torch.nn.utils.prune), or None."""
        mask = getattr(self.module, "weight_mask", None) if self.part is None else None
        return None if mask is None else mask.flatten(1).eq(0)

    def write(self, new):
        """Set the unit's weights to new (rows x columns); for a layer that carries a pruning mask,
        its unmasked weight, and its mask to keep new's zeros (and its own)."""
        layer, (weight, rows) = self.module, self.tensor()
        new = new.to(weight.dtype)
        if self.part is None and hasattr(layer, "weight_orig") and hasattr(layer, "weight_mask"):
            layer.weight_orig.copy_(new.view_as(layer.weight_orig))
            layer.weight_mask.mul_(new.ne(0).view_as(layer.weight_mask).to(layer.weight_mask.dtype))
            setattr(layer, "weight", layer.weight_orig * layer.weight_mask)
        else:
            target = weight if rows is None else weight[rows]
            target.copy_(new.view_as(target))

    def describe(self, name):
        """The unit in words, for a message: the module's name and kind, and the part."""
        part = f", its {self.part} projection" if self.part else ""
        return f"layer {name} ({type(self.module).__name__}{part})"

    def inputs(self, args, kwargs):
        """The unit's inputs as rows its weight multiplies, from the arguments of its module's call."""
        if self.part is None:
            return inputs_of(self.module, args[0])
        given = call_arguments(self.module, args, kwargs)
        if self.part != "output":
            return given[self.part].flatten(0, -2)
        return heads(self.module, given).flatten(0, -2)


def inputs_of(layer, h):
    """A weighted layer's input h as rows its weight (flattened to 2-d) multiplies: a Linear's as
    it is (every leading dimension a row: tokens too), a convolution's unfolded into one row per
    output position, padded as the convolution pads ("same", "valid", reflect, circular)."""
    if isinstance(layer, nn.Linear):
        return h.flatten(0, -2)
    if h.dim() == 3:  # one unbatched image
        h = h[None]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(h, layer._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(padded, layer.kernel_size, layer.dilation, 0, layer.stride)  # (N, C*k*k, L)
    return cols.transpose(1, 2).flatten(0, 1)


def call_arguments(attention, args, kwargs):
    """The arguments of a call of nn.MultiheadAttention by name (query, key, value, the masks...)."""
    bound = inspect.signature(type(attention).forward).bind(attention, *args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


def heads(attention, given):
    """The heads' outputs, concatenated, of the attention called with `given`: what its output
    projection multiplies (the call again, the output projection the identity: no hook runs)."""
    width, out = attention.embed_dim, attention.out_proj
    identity = {"out_proj.weight": torch.eye(width, dtype=out.weight.dtype, device=out.weight.device)}
    if out.bias is not None:
        identity["out_proj.bias"] = torch.zeros_like(out.bias)
    with without_hooks(attention):
        return torch.func.functional_call(attention, identity, (), dict(given, need_weights=False))[0]


@contextlib.contextmanager
def without_hooks(module):
    """Within: module's forward pre-hooks set aside (they record; this call is not the model's)."""
    hooks = dict(module._forward_pre_hooks)
    module._forward_pre_hooks.clear()
    try:
        yield
    finally:
        module._forward_pre_hooks.update(hooks)


def units_of(module):
    """The units of a module the forward calls: a layer's one, an attention's four."""
    return [Unit(module, part) for part in PARTS] if isinstance(module, nn.MultiheadAttention) else [Unit(module)]


@contextlib.contextmanager
def attention_as_written():
    """Within: nn.MultiheadAttention and nn.TransformerEncoderLayer run their Python forward, not
    PyTorch's fused inference path, which calls no hook and whose layers one_shot would not see."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
