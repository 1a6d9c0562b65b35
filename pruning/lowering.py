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

MAX_STORED = 1 << 24  # the most entries a lowered layer may store (128 MB of indices and values; a few times
# that while they are built)


class Lowered(nn.Module):
    """A convolution (nn.Conv2d, ungrouped, zero-padded) or a max-pooling (nn.MaxPool2d, no padding,
    no dilation) of inputs shaped `shape` (channels, height, width), as the kernel's rows."""

    def __init__(self, module, shape):
        super().__init__()
        self.module, self.shape = module, tuple(shape)
        with torch.no_grad():
            self.out_shape = tuple(module(torch.zeros(1, *shape, dtype=torch.float32, device="cpu")).shape[1:])
        self.in_features, self.out_features = math.prod(self.shape), math.prod(self.out_shape)

    def rows(self):
        """(each row's length, the input each stored entry reads as uint32, the entries' weights as
        fp32 (zeros for a pooling), each row's bias, the kernel's storage code)."""
        if self.entries() > MAX_STORED:
            raise ValueError(f"{self.module} over {self.shape} would store {self.entries():,} entries")
        if isinstance(self.module, nn.Conv2d):
            return convolution_rows(self.module, self.shape, self.out_shape)
        return pooling_rows(self.module, self.shape, self.out_shape)

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
    bias = (np.zeros(out_shape[0] * places, np.float32) if conv.bias is None
            else conv.bias.detach().cpu().float().repeat_interleave(places).numpy())
    return lengths, index, stored, bias, kernels.SPARSE


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
    lengths, index, stored = in_order(rows, columns, torch.zeros(len(rows)), channels * places)
    return lengths, index, stored, np.zeros(channels * places, np.float32), kernels.MAX
