"""The sparse kernel: a chain of fully connected layers, each stored as compressed sparse rows,
run on a batch in one compiled call (numba). Imported only when a model is prepared for
inference, since compiling takes a second or two the first time (then it is cached on disk).

The batch is cut into tiles of `tile` images. A tile's activations are held feature-major,
(features, images), so each non-zero weight adds w times one input row to one output row: a
product over the tile's images that the compiler vectorises, four weights at a time so that the
output row is loaded and stored once for four of them. A tile of one image (batch 1) keeps each
output unit's sum in a register instead, and reads a layer stored dense as contiguous dot
products. Every index is unsigned: numba checks a signed index for
wrap-around on every access, which keeps the compiler from vectorising the loop."""

import numpy as np
from numba import njit, prange, set_num_threads, uint64  # noqa: F401 -- set_num_threads for callers

NONE, RELU = 0, 1  # activation after a layer
SPARSE, DENSE = 0, 1  # how a layer's rows are stored: its non-zeros, or every weight
ZERO, ONE, FOUR = uint64(0), uint64(1), uint64(4)


@njit(fastmath=True, nogil=True, cache=True, inline="always")
def row_of_one(start, end, indices, data, a, dense):
    """One output unit of one image: the sum of w * a[column] over the row's stored weights; a
    dense row (every column stored, in order) is read as a contiguous dot product."""
    total = np.float32(0)
    if dense:
        for k in range(end - start):
            total += data[start + k] * a[k]
    else:
        for k in range(start, end):
            total += data[k] * a[indices[k]]
    return total


@njit(fastmath=True, nogil=True, cache=True, inline="always")
def add_row_products(start, end, indices, data, a, b, o, width):
    """b[o:o+width] += the row's non-zeros times the input rows they read (rows of `width` values)."""
    k = start
    while k + FOUR <= end:
        w0, w1, w2, w3 = data[k], data[k + ONE], data[k + uint64(2)], data[k + uint64(3)]
        s0, s1 = indices[k] * width, indices[k + ONE] * width
        s2, s3 = indices[k + uint64(2)] * width, indices[k + uint64(3)] * width
        for n in range(width):
            b[o + n] += w0 * a[s0 + n] + w1 * a[s1 + n] + w2 * a[s2 + n] + w3 * a[s3 + n]
        k += FOUR
    while k < end:
        w0, s0 = data[k], indices[k] * width
        for n in range(width):
            b[o + n] += w0 * a[s0 + n]
        k += ONE


@njit(fastmath=True, nogil=True, cache=True, inline="always")
def add_four_rows(data, r0, cols, a, b, o0, width):
    """b's rows o0.. (four of them, `width` apart) += four dense weight rows (from data[r0], `cols`
    apart) times the inputs: each input row is loaded once for the four, four columns at a time."""
    r1, r2, r3 = r0 + cols, r0 + uint64(2) * cols, r0 + uint64(3) * cols
    o1, o2, o3 = o0 + width, o0 + uint64(2) * width, o0 + uint64(3) * width
    k = ZERO
    while k + FOUR <= cols:
        k1, k2, k3 = k + ONE, k + uint64(2), k + uint64(3)
        w00, w01, w02, w03 = data[r0 + k], data[r0 + k1], data[r0 + k2], data[r0 + k3]
        w10, w11, w12, w13 = data[r1 + k], data[r1 + k1], data[r1 + k2], data[r1 + k3]
        w20, w21, w22, w23 = data[r2 + k], data[r2 + k1], data[r2 + k2], data[r2 + k3]
        w30, w31, w32, w33 = data[r3 + k], data[r3 + k1], data[r3 + k2], data[r3 + k3]
        s0, s1, s2, s3 = k * width, k1 * width, k2 * width, k3 * width
        for n in range(width):
            x0, x1, x2, x3 = a[s0 + n], a[s1 + n], a[s2 + n], a[s3 + n]
            b[o0 + n] += w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3
            b[o1 + n] += w10 * x0 + w11 * x1 + w12 * x2 + w13 * x3
            b[o2 + n] += w20 * x0 + w21 * x1 + w22 * x2 + w23 * x3
            b[o3 + n] += w30 * x0 + w31 * x1 + w32 * x2 + w33 * x3
        k += FOUR
    while k < cols:
        s0 = k * width
        w0, w1, w2, w3 = data[r0 + k], data[r1 + k], data[r2 + k], data[r3 + k]
        for n in range(width):
            x0 = a[s0 + n]
            b[o0 + n] += w0 * x0
            b[o1 + n] += w1 * x0
            b[o2 + n] += w2 * x0
            b[o3 + n] += w3 * x0
        k += ONE


@njit(fastmath=True, nogil=True, cache=True)
def layer_of_one(rows, pointers, biases, activation, dense, indptr, indices, data, bias, a, b):
    """One layer on a tile of one image: b = activation(W a + bias)."""
    for i in range(rows):
        start, end = indptr[pointers + i], indptr[pointers + i + ONE]
        y = bias[biases + i] + row_of_one(start, end, indices, data, a, dense)
        b[i] = max(y, np.float32(0)) if activation == RELU else y


@njit(fastmath=True, nogil=True, cache=True)
def layer_of_many(rows, pointers, biases, activation, dense, indptr, indices, data, bias, a, b, width):
    """One layer on a tile of `width` images, feature-major: b = activation(W a + bias)."""
    for i in range(rows):
        o = i * width
        for n in range(width):
            b[o + n] = bias[biases + i]
    blocked = rows - rows % FOUR if dense else ZERO  # a dense layer's rows, four at a time
    for i in range(ZERO, blocked, FOUR):
        start, end = indptr[pointers + i], indptr[pointers + i + ONE]
        add_four_rows(data, start, end - start, a, b, i * width, width)
    for i in range(blocked, rows):
        add_row_products(indptr[pointers + i], indptr[pointers + i + ONE], indices, data, a, b, i * width, width)
    if activation == RELU:
        for n in range(rows * width):
            b[n] = max(b[n], np.float32(0))


@njit(fastmath=True, nogil=True, cache=True)
def run_tile(x, first, count, columns, shift, scale, layers, indptr, indices, data, bias, out, a, b):
    """Images first..first+count of x through every layer; a and b are the tile's two buffers."""
    first, width = uint64(first), uint64(count)
    for j in range(uint64(columns.shape[0])):
        c = columns[j]
        for n in range(width):
            a[j * width + n] = (x[first + n, c] - shift) / scale
    for layer in range(layers.shape[0]):
        rows, pointers, biases, activation, dense = layers[layer, 0], layers[layer, 1], layers[layer, 2], \
            layers[layer, 3], layers[layer, 4]
        if width == ONE:
            layer_of_one(rows, pointers, biases, activation, dense, indptr, indices, data, bias, a, b)
        else:
            layer_of_many(rows, pointers, biases, activation, dense, indptr, indices, data, bias, a, b, width)
        a, b = b, a
    for n in range(width):
        for i in range(uint64(out.shape[1])):
            out[first + n, i] = a[i * width + n]


@njit(fastmath=True, nogil=True, cache=True)
def run(x, columns, shift, scale, layers, indptr, indices, data, bias, out, tile, width):
    """The whole batch, one tile after another, in this thread."""
    a, b = np.empty(width * tile, np.float32), np.empty(width * tile, np.float32)
    for first in range(0, x.shape[0], tile):
        count = min(tile, x.shape[0] - first)
        run_tile(x, first, count, columns, shift, scale, layers, indptr, indices, data, bias, out, a, b)


@njit(fastmath=True, nogil=True, parallel=True, cache=True)
def run_parallel(x, columns, shift, scale, layers, indptr, indices, data, bias, out, tile, width):
    """The whole batch, its tiles shared among numba's threads."""
    tiles = (x.shape[0] + tile - 1) // tile
    for t in prange(tiles):
        a, b = np.empty(width * tile, np.float32), np.empty(width * tile, np.float32)
        first = t * tile
        count = min(tile, x.shape[0] - first)
        run_tile(x, first, count, columns, shift, scale, layers, indptr, indices, data, bias, out, a, b)
