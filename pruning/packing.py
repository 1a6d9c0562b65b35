"""A run of fully connected layers packed for the kernel of kernels.py, and called: every layer's
stored weights as rows in one set of arrays, the layer table and the pointers the kernel's driver
reads (kernels.PLAN), the buffers it writes, and the threads that share a large batch."""

import ctypes
import functools
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pruning import kernels
from pruning.columns import COLUMNS_BELOW, columns_of
from pruning.kernels import TILES
from pruning.lowering import Lowered

GIL = getattr(sys, "_is_gil_enabled", lambda: True)()  # whether a call that keeps the GIL runs alone (a
# free-threaded Python may turn the GIL on as it runs, never off)


def aligned(buffer):
    """The first address in buffer (a float tensor) on a 64-byte boundary: a cache line's."""
    return buffer.data_ptr() + (-buffer.data_ptr()) % 64


def in_parallel(work, threads):
    """work(k) for k in range(threads), on as many threads, the caller's among them. On PyTorch's
    own OpenMP threads where PyTorch runs GNU OpenMP (Linux) in this process: threads of another
    pool would wait for cores that PyTorch's threads still spin on after each of its calls, which
    halved the kernel's speed at batch 10,000 when torch was imported before pruning (docs/speed.md).
    Elsewhere, and in a forked child, a pool of this process's own."""
    parallel = openmp() if os.getpid() == LOADED_IN else None
    if parallel is None:
        others = [pool(threads - 1).submit(work, k) for k in range(1, threads)]
        work(0)
        for other in others:
            other.result()
        return
    shares, failed = itertools.count(), []

    def team_member(_):
        try:
            while (k := next(shares)) < threads:  # whatever the team's size, each share once
                work(k)
        except BaseException as e:  # an OpenMP thread cannot raise: said after the team is done
            failed.append(e)

    parallel(OPENMP_WORK(team_member), None, threads, 0)
    if failed:
        raise failed[0]


LOADED_IN = os.getpid()  # a forked child inherits OpenMP's threads dead, so it uses a pool of its own
OPENMP_WORK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@functools.cache
def openmp():
    """GOMP_parallel of the GNU OpenMP runtime PyTorch has loaded, or None where it has none."""
    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY).GOMP_parallel
    except (OSError, AttributeError):
        return None


def pool(threads):
    """The threads that share a large batch's tiles with the caller's where OpenMP's cannot: started
    once a process, when first needed (a forked child, which inherits no running thread, starts its own)."""
    return threads_of(threads, os.getpid())


@functools.cache
def threads_of(threads, process):
    return ThreadPoolExecutor(threads, thread_name_prefix="pruning-kernel")


CPU = torch.device("cpu")


def empty(*shape):
    """An uninitialised fp32 tensor on the CPU, whatever the process's default dtype and device: the
    kernel writes fp32 to CPU memory."""
    return torch.empty(*shape, dtype=torch.float32, device=CPU)


def stored_rows(weight, whole, read):
    """A layer's weight (rows x columns; only the columns `read`, where given) as the kernel stores
    it: (each row's length, the column of each stored weight as uint32, the stored weights as fp32),
    every weight where whole, else its non-zeros in row order."""
    weight = weight.cpu().float()
    if read is not None and not np.array_equal(read, np.arange(weight.shape[1])):
        weight = weight[:, torch.as_tensor(read, dtype=torch.long)]
    rows, cols = weight.shape
    if whole:
        return (np.full(rows, cols, np.int64), np.tile(np.arange(cols, dtype=np.uint32), rows),
                weight.contiguous().numpy().ravel())
    row, index = weight.nonzero().unbind(1)  # in row order, as the kernel reads them
    lengths = torch.bincount(row, minlength=rows)
    return lengths.numpy(), index.to(torch.int32).numpy().view(np.uint32), weight[row, index].numpy()


def layer_rows(layer, whole, read):
    """A layer as the kernel stores it: (each row's length, the input of each stored entry as
    uint32, the entries as fp32, each row's bias, the storage code, each strip's first output and
    outputs for a convolution in strips, else None). An nn.Linear as stored_rows says (whole: every
    weight); a convolution or a pooling (lowering.Lowered) as its rows (whole: a convolution in
    strips)."""
    if isinstance(layer, Lowered):
        return layer.rows(strips=whole)
    lengths, index, values = stored_rows(layer.weight.detach(), whole, read)
    bias = np.zeros(len(lengths), np.float32) if layer.bias is None else layer.bias.detach().cpu().float().numpy()
    return lengths, index, values, bias, kernels.WHOLE if whole else kernels.SPARSE, None


def input_read_again(routes):
    """Whether a layer after the first reads the buffer the first reads (the input, as one image's
    first layer by its rows reads it: picked and normalised) before a layer writes another there."""
    buffer = routes[0][0]
    for reads, writes, _, adds in routes[1:]:
        if buffer in (reads, adds):
            return True
        if writes == buffer:
            return False
    return False


def rebuilt(arguments, tile, threads, routes=None):
    """A KernelLayers from the arguments it was made with, tuned as given (for copies and pickles:
    a KernelLayers holds the raw addresses of its own arrays)."""
    made = KernelLayers(*arguments, routes=routes)
    made.tile, made.threads = tile, threads
    return made


class KernelLayers:
    """A run of layers (nn.Linear, and convolutions and poolings as lowering.Lowered), each with
    its activation, packed for the kernel: every layer's stored weights as rows in one set of
    arrays. It reads inputs of `inputs` values, as (x - shift) / scale; the first layer's inputs
    `read` are the input's `columns`: the input normalisation, the kept pixels and the inputs no
    weight reads folded into how it gathers.
    checked: the inputs the model's first layer reads, zero weights or not (all where None): an image
    with one of them not finite gets NaN outputs, as a dense layer gives.
    packed: a dict in which each layer's stored rows are kept for the next KernelLayers of the same
    model (storing a large layer's non-zeros takes seconds)."""

    def __init__(self, layers, dense, inputs, columns=None, shift=0.0, scale=1.0, read=None, checked=None, *,
                 packed=None, routes=None):
        packed = {} if packed is None else packed  # layers already stored, shared by plans of one model
        self.arguments = (layers, dense, inputs, columns, shift, scale, read, checked)
        self.routes = [(k % 2, 1 - k % 2, 0, -1) for k in range(len(layers))] if routes is None else routes
        if len(self.routes) != len(layers) or any(min(r, w, at) < 0 or a < -1 or w in (r, a)
                                                  for r, w, at, a in self.routes):
            raise ValueError(f"each layer must read one buffer and write another: not routes {self.routes}")
        columns = np.arange(inputs) if columns is None else np.asarray(columns)
        first = layers[0][0].in_features if read is None else len(read)
        if len(columns) != first or (len(columns) and not 0 <= columns.min() <= columns.max() < inputs):
            raise ValueError(f"the kernel's first layer reads {first} of {inputs} inputs, not columns "
                             f"{columns.min() if len(columns) else ''}..{columns.max() if len(columns) else ''}")
        pointers, indices, data, biases, table = [np.zeros(1, np.int64)], [], [], [], []
        stored = rows_before = pointers_before = 0
        for k, ((layer, activation), whole) in enumerate(zip(layers, dense)):
            read_here = read if k == 0 else None
            whole = whole and not (k == 0 and isinstance(layer, Lowered) and not np.array_equal(
                columns, np.arange(inputs)))  # a strip's outputs read inputs a step apart: all the inputs, in order
            key = (id(layer), whole, None if read_here is None else tuple(read_here))
            if key not in packed:  # the layer kept beside its rows: no other object takes its id while packed lives
                packed[key] = layer, layer_rows(layer, whole, read_here)
            lengths, index, values, bias, storage, strips = packed[key][1]
            rows, groups = len(bias), len(lengths)
            if k == 0:  # a tile reads the input's columns; one image, those columns picked in order
                first_indices, index = index, columns[index]
                first_rows = lengths, index, values, bias, storage == kernels.SPARSE and not isinstance(layer, Lowered)
            table.append([rows, pointers_before, rows_before, activation, storage, groups, *self.routes[k]])
            ends = stored + np.cumsum(lengths, dtype=np.int64)
            pointers.append(ends if strips is None else np.column_stack([strips, ends]).ravel())  # start of the
            # next group, after each strip's first output and outputs (the kernel reads a strip's three and the next)
            indices.append(index.astype(np.uint32))
            data.append(values)
            biases.append(bias)
            stored, rows_before, pointers_before = stored + int(lengths.sum()), rows_before + rows, \
                pointers_before + len(pointers[-1])
        self.layers, self.first_indices = np.array(table, np.int64), first_indices
        self.columns = columns.astype(np.int64)
        self.indptr, self.indices = np.concatenate(pointers), np.concatenate(indices)
        self.data, self.bias = np.concatenate(data), np.concatenate(biases).astype(np.float32)
        read_blocks = np.unique(columns[columns < inputs - inputs % kernels.LANES] // kernels.LANES)
        self.blocks = (read_blocks * kernels.LANES).astype(np.int64)
        self.checked = np.arange(inputs, dtype=np.int64) if checked is None else np.asarray(checked, np.int64)
        self.scales = np.array([shift, 1 / scale], np.float32)
        self.buffers = 1 + max(max(route[:2] + route[3:]) for route in self.routes)
        lengths, index, values, bias, sparse = first_rows
        self.by_columns = self.buffers if sparse and not input_read_again(self.routes) else 0
        self.buffers += self.by_columns > 0  # a buffer more, for the list of one image's inputs not zero
        by_columns = columns_of(lengths, index, values, bias, inputs, float(self.scales[0]), float(self.scales[1])) \
            if self.by_columns else [np.zeros(1, np.int64)] * 4
        self.column_pointers, self.column_rows, self.column_values, self.column_bias = by_columns
        self.inputs, self.outputs = inputs, int(self.layers[-1, 0])
        self.width = max(inputs, *(self.layers[:, 0] + self.layers[:, 8]).tolist(),  # rows, past a concatenation's
                         *(layer.in_features for layer, _ in layers))  # earlier parts; what each layer reads
        self.tile, self.threads = TILES[-1], 1
        fields = dict(layers=self.layers, count=len(self.layers), indptr=self.indptr, indices=self.indices,
                      data=self.data, bias=self.bias, blocks=self.blocks, block_count=len(self.blocks),
                      inputs=inputs, outputs=self.outputs, columns=self.columns, column_count=len(self.columns),
                      first_indices=self.first_indices, checked=self.checked, checked_count=len(self.checked),
                      by_columns=self.by_columns, lit_most=int(COLUMNS_BELOW * inputs),
                      column_pointers=self.column_pointers, column_rows=self.column_rows,
                      column_values=self.column_values, column_bias=self.column_bias)
        self.plan = np.array([v.ctypes.data if isinstance(v, np.ndarray) else v for v in map(fields.get, kernels.PLAN)],
                             np.int64)
        self.plan_at, self.scales_at = self.plan.ctypes.data, self.scales.ctypes.data
        self.scratch, self.scratch_free = empty(0), threading.Lock()  # buffers kept between calls
        self.one = empty(self.buffers * self.width + 16)  # one image's buffers (under the GIL, or that lock)
        self.one_at = aligned(self.one)
        _, self.runs, self.run_image = kernels.compiled()
        self.image_arguments = np.array([self.plan_at, self.scales_at, inputs, self.one_at,
                                         self.one_at + 4 * self.width], np.int64)  # kernels.IMAGE
        self.image_at = self.image_arguments.ctypes.data

    def __reduce__(self):
        return rebuilt, (self.arguments, self.tile, self.threads, self.routes)

    def __call__(self, x):
        """x: fp32 on the CPU, contiguous, each of its len(x) inputs `inputs` values. Returns (batch, outputs)."""
        if (x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous() or x.dim() == 0
                or x.numel() != len(x) * self.inputs):
            raise ValueError(f"the kernel reads contiguous fp32 CPU inputs of {self.inputs} values each, "
                             f"not {x.dtype} {tuple(x.shape)} on {x.device}")
        return self.run(x)

    def image(self, x):
        """run for one image (a contiguous fp32 CPU tensor of `inputs` values, checked by the caller)."""
        if not GIL:
            return self.run(x)
        out = x.new_empty(1, self.outputs)  # x's dtype and device: fp32 on the CPU (a few tenths of a µs
        self.run_image(self.image_at, x.data_ptr(), out.data_ptr())  # less than torch.empty naming them)
        return out  # the call alone, in the buffers made for it, under the GIL

    def run(self, x):
        """__call__ without its checks, for a caller that has made them (plans.Prepared)."""
        batch = x.shape[0]
        out = torch.empty(batch, self.outputs, dtype=torch.float32, device=CPU)  # empty(), a call less
        if batch == 1 and GIL:  # one image: the call alone, in the buffers made for it (a few µs of Python are
            self.run_image(self.image_at, x.data_ptr(), out.data_ptr())  # most of its time), under the GIL
            return out
        if batch == 1 and self.scratch_free.acquire(blocking=False):  # a Python without a GIL: under the lock
            try:
                self.run_image(self.image_at, x.data_ptr(), out.data_ptr())
            finally:
                self.scratch_free.release()
            return out
        if batch == 0:
            return out
        tile = 1 if batch == 1 else self.tile
        tiles, size = -(-batch // tile), self.width * tile
        threads = min(self.threads, tiles, torch.get_num_threads())  # a DataLoader worker's 1 kept
        share = -(-tiles // threads) * tile

        def part(k, buffers):
            """Images of the k-th share through the kernel, in the two buffers from address `buffers`."""
            self.runs[tile](self.plan_at, self.scales_at, x.data_ptr(), self.inputs, k * share,
                            min((k + 1) * share, batch), out.data_ptr(), buffers, buffers + 4 * size)  # buffer
            # j of the share from buffers + 4 * size * j (kernels.FIELDS)

        if threads == 1 and self.scratch_free.acquire(blocking=False):
            try:  # the buffers kept for one call at a time
                if len(self.scratch) < self.buffers * size + 16:
                    self.scratch = empty(self.buffers * size + 16)
                part(0, aligned(self.scratch))
            finally:
                self.scratch_free.release()
            return out
        buffers = empty(threads * self.buffers * size + 16)  # kept until the shares are done
        at = aligned(buffers)
        in_parallel(lambda k: part(k, at + 4 * self.buffers * size * k), threads)
        return out

    def __repr__(self):
        names = {kernels.SPARSE: "sparse", kernels.WHOLE: "rows", kernels.MAX: "max", kernels.STRIP: "strips"}
        ways = [names[storage] for storage in self.layers[:, 4].tolist()]
        return f"KernelLayers({', '.join(ways)}; tiles of {self.tile}, {self.threads} threads)"
