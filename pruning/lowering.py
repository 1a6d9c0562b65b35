"""Convolutions and max-pooling as rows of the kernel (kernels.py): each output of the layer, one
channel at one position, is a row over the flattened input (channels, height, width) it reads. A
convolution's row holds each non-zero weight of its filter once for every position it meets
inside the input (the zero padding reads nothing), so the kernel does exactly the multiply-adds
the non-zeros need; a max-pooling row holds the inputs of its window, and the kernel takes their
largest. The rows come in PyTorch's order (channel, then y, then x), which is what nn.Flatten
gives the layer after."""

import math

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from pruning import kernels
from pruning.strips import STRIP_OUTPUTS

MAX_STORED = 1 << 24  # the most entries a lowered layer may store (128 MB of indices and values; a few times
# that while they are built)


class Lowered(nn.Module):
    """A convolution (nn.Conv2d, ungrouped, zero-padded) or a pooling (nn.MaxPool2d, no padding, no
    dilation; nn.AvgPool2d over whole windows, as an average over each channel's whole image is) of
    inputs shaped `shape` (channels, height, width), as the kernel's rows."""

    def __init__(self, module, shape):
        super().__init__()
        self.module, self.shape = module, tuple(shape)
        with torch.no_grad():
            self.out_shape = tuple(module(torch.zeros(1, *shape, dtype=torch.float32, device="cpu")).shape[1:])
        self.in_features, self.out_features = math.prod(self.shape), math.prod(self.out_shape)

    def rows(self, strips=False):
        """(each row's length, the input each stored entry reads as uint32, the entries' weights as
        fp32 (zeros for a pooling), each row's bias, the kernel's storage code, and for a convolution
        in strips each strip's (first output, outputs + input step << 16), else None). strips: a
        convolution as strips of up to STRIP_OUTPUTS outputs along a row of the image, sharing their
        weights (convolution_strips), rather than one row an output."""
        if self.entries() > MAX_STORED:
            raise ValueError(f"{self.module} over {self.shape} would store {self.entries():,} entries")
        if isinstance(self.module, nn.Conv2d):
            make = convolution_strips if strips else convolution_rows
            return make(self.module, self.shape, self.out_shape)
        return (*pooling_rows(self.module, self.shape, self.out_shape), None)

    def entries(self):
        """How many entries rows() stores, at most (a convolution's non-zeros at every position,
        padding included), before it builds them."""
        places = self.out_shape[1] * self.out_shape[2]
        if isinstance(self.module, nn.Conv2d):
            return int(self.module.weight.count_nonzero()) * places
        return self.out_features * math.prod(_pair(self.module.kernel_size))

    def extra_repr(self):
        return f"{self.shape} -> {self.out_shape}"


def lowerable(module):
    """Whether the kernel can run module as rows: an ungrouped zero-padded nn.Conv2d, or an
    nn.MaxPool2d without padding, dilation, ceil_mode or indices (as PyTorch writes them)."""
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros"
    if type(module) is nn.MaxPool2d:
        return (module.padding in (0, (0, 0)) and module.dilation in (1, (1, 1)) and not module.ceil_mode
                and not module.return_indices)
    return False


def positions(out_shape):
    """(y, x) of every output position, y-major: (P,) each."""
    _, height, width = out_shape
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return y.flatten(), x.flatten()


def in_order(rows, columns, values, count):
    """The entries sorted by row, then column, as CSR: (lengths, columns as uint32, values as fp32)."""
    order = torch.argsort(rows * (columns.max() + 1 if len(columns) else 1) + columns)
    lengths = torch.bincount(rows, minlength=count)
    return (lengths.numpy().astype(np.int64), columns[order].to(torch.int32).numpy().view(np.uint32),
            values[order].to(torch.float32).numpy())


def convolution_rows(conv, shape, out_shape):
    channels, height, width = shape
    left, _, top, _ = conv._reversed_padding_repeated_twice
    weight = conv.weight.detach().cpu().float()
    out, inp, ky, kx = weight.nonzero().unbind(1)  # the non-zeros, (K,) each
    values = weight[out, inp, ky, kx]
    y, x = positions(out_shape)
    iy = y[None, :] * conv.stride[0] - top + ky[:, None] * conv.dilation[0]  # (K, P)
    ix = x[None, :] * conv.stride[1] - left + kx[:, None] * conv.dilation[1]
    inside = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
    places = len(y)
    rows = (out[:, None] * places + torch.arange(places)[None, :])[inside]
    columns = (inp[:, None] * height * width + iy * width + ix)[inside]
    lengths, index, stored = in_order(rows, columns, values[:, None].expand(-1, places)[inside], out_shape[0] * places)
    return lengths, index, stored, bias_of(conv, out_shape), kernels.SPARSE, None


def bias_of(conv, out_shape):
    """Each output's bias, in PyTorch's order (channel, then y, then x)."""
    places = out_shape[1] * out_shape[2]
    return (np.zeros(out_shape[0] * places, np.float32) if conv.bias is None
            else conv.bias.detach().cpu().float().repeat_interleave(places).numpy())


def strips_of_row(width, out_width, stride, left, dilation, size):
    """[(first x, outputs, the kernel columns kx every output of the strip reads inside the image)]
    covering one output row of out_width positions: the row cut where the columns inside change
    (near the padding), each part cut into strips of STRIP_OUTPUTS outputs, the last overlapping the
    one before (computing some outputs twice, alike) so that every strip of a part that long is full."""
    low = [max(0, -(-(left - kx * dilation) // stride)) for kx in range(size)]  # first x where column kx is inside
    high = [min(out_width - 1, (width - 1 + left - kx * dilation) // stride) for kx in range(size)]
    cuts = sorted({0, out_width, *(c for c in low + [h + 1 for h in high] if 0 < c < out_width)})
    strips = []
    for a, b in zip(cuts, cuts[1:]):
        inside = [kx for kx in range(size) if low[kx] <= a and b - 1 <= high[kx]]
        if b - a < STRIP_OUTPUTS:
            strips.append((a, b - a, inside))
            continue
        strips += [(min(start, b - STRIP_OUTPUTS), STRIP_OUTPUTS, inside)
                   for start in range(a, b, STRIP_OUTPUTS)]
    return strips


def convolution_strips(conv, shape, out_shape):
    """A convolution as strips: each strip STRIP_OUTPUTS (or fewer) consecutive outputs of one
    channel along a row of the image, stored once as the non-zero weights that every one of its
    outputs reads inside the input, each with the input its first output reads; the next output
    reads the input `stride` further along the row. The kernel sums a strip's outputs together, each weight loaded
    once for all of them."""
    channels, height, width = shape
    _, out_height, out_width = out_shape
    left, _, top, _ = conv._reversed_padding_repeated_twice
    weight = conv.weight.detach().cpu().float().numpy()
    along = strips_of_row(width, out_width, conv.stride[1], left, conv.dilation[1], weight.shape[3])
    lengths, index, values, strips = [], [], [], []
    kept = [weight[out].nonzero() for out in range(out_shape[0])]  # each output channel's (inp, ky, kx), in order
    for y in range(out_height):
        for x, count, inside_x in along:
            for out, (inp, ky, kx) in enumerate(kept):  # by place, then channel: no faster measured than the reverse
                iy = y * conv.stride[0] - top + ky * conv.dilation[0]
                use = (iy >= 0) & (iy < height) & np.isin(kx, inside_x)
                ix = x * conv.stride[1] - left + kx[use] * conv.dilation[1]
                index.append(inp[use] * height * width + iy[use] * width + ix)
                values.append(weight[out][inp[use], ky[use], kx[use]])
                lengths.append(int(use.sum()))
                strips.append((out * out_height * out_width + y * out_width + x, count + (conv.stride[1] << 16)))
    return (np.array(lengths, np.int64), np.concatenate(index).astype(np.uint32),
            np.concatenate(values).astype(np.float32), bias_of(conv, out_shape), kernels.STRIP,
            np.array(strips, np.int64).reshape(-1, 2))


def pooling_rows(pool, shape, out_shape):
    channels, height, width = shape
    size, stride = _pair(pool.kernel_size), _pair(pool.stride)
    y, x = positions(out_shape)
    ky, kx = (t.flatten() for t in torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij"))
    iy, ix = y[:, None] * stride[0] + ky[None, :], x[:, None] * stride[1] + kx[None, :]  # (P, window)
    places, window = iy.shape
    channel = torch.arange(channels)[:, None, None]
    columns = (channel * height * width + (iy * width + ix)[None]).flatten()
    rows = (channel * places + torch.arange(places)[None, :, None]).expand(-1, -1, window).flatten()
    average = isinstance(pool, nn.AvgPool2d)  # each input times 1 / window, summed; else the largest taken
    lengths, index, stored = in_order(rows, columns, torch.full((len(rows),), 1 / window if average else 0.0),
                                      channels * places)
    return lengths, index, stored, np.zeros(channels * places, np.float32), kernels.SPARSE if average else kernels.MAX
