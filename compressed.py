"""The compressed model file: each layer's weights shared among 2^B values found by k-means,
the positions of the non-zero weights as gaps or a bitmask, all entropy-coded by LZMA
(Deep Compression, Han et al. 2016, with LZMA in place of Huffman coding).

File: magic b"MLPZ", format version (1 byte), body length and CRC-32 of the body (4 bytes each,
little-endian), then the body, an LZMA2 raw stream of: the number of layers, the widths, and the
indices of the input pixels read (none: all of them), then per layer its position encoding, its shared values (fp32), its biases (fp32), its
positions and one code (a byte) per stored weight.
"""

import copy
import lzma
import struct
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

import common
import files

MAGIC, VERSION = b"MLPZ", 1
HEADER = struct.Struct("<4sBII")
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
ALL, GAPS, BITMASK = 0, 1, 2  # positions: every weight stored; gaps between stored weights; one bit per weight
GAP_ESCAPE = 255  # a gap byte of 255 adds 255 to the gap and is followed by more of it


# Weight sharing -----------------------------------------------------------------------

def kmeans(values, k, iterations=100):
    """1-D k-means with centroids spread linearly over [min, max] at the start, as Deep Compression
    found best: (centroids, code of each value). Centroids no value is nearest to are dropped."""
    centroids = torch.linspace(values.min().item(), values.max().item(), k, dtype=torch.float64)
    values = values.double()
    codes = None
    for _ in range(iterations):
        new_codes = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        if codes is not None and torch.equal(new_codes, codes):
            break
        codes = new_codes
        counts = torch.bincount(codes, minlength=len(centroids))
        sums = torch.bincount(codes, weights=values, minlength=len(centroids))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    used = torch.bincount(codes, minlength=len(centroids)) > 0
    return centroids[used].float(), (used.cumsum(0) - 1)[codes]


class SharedWeights(nn.Module):
    """A layer's weight as codebook[codes], 0 where the code is -1. The codebook is the parameter
    that trains: each shared value's gradient is the sum of those of the weights that share it."""

    def __init__(self, codebook, codes):
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("codes", codes)

    def forward(self, _):
        return F.pad(self.codebook, (1, 0))[self.codes + 1]


def quantize(model, bits):
    """A copy of model whose layers share at most 2^bits weight values each; zeros stay zero
    unless no weight of the layer is zero, when all are shared."""
    quantized = copy.deepcopy(model)
    for layer in common.linears(quantized):
        weight = layer.weight.detach()
        stored = weight != 0 if (weight == 0).any() else torch.ones_like(weight, dtype=torch.bool)
        codes = torch.full(weight.shape, -1, dtype=torch.long, device=weight.device)
        codebook = torch.zeros(0)
        if stored.any():
            codebook, codes[stored] = kmeans(weight[stored].cpu(), 2 ** bits)
        parametrize.register_parametrization(layer, "weight", SharedWeights(codebook.to(weight.device), codes),
                                             unsafe=True)
    return quantized


def shared_values(layer):
    """(codebook, codes) of a layer of a quantized model."""
    shared = layer.parametrizations.weight[0]
    return shared.codebook.detach().cpu(), shared.codes.cpu()


# Positions ----------------------------------------------------------------------------

def encode_gaps(positions):
    """Bytes of the gaps before each position (-1 before the first), a gap of 255 or more written
    as that many GAP_ESCAPE bytes, 255 each, and then the rest."""
    gaps = np.diff(positions, prepend=-1) - 1
    escapes, rests = np.divmod(gaps, GAP_ESCAPE)
    out = np.full(len(gaps) + escapes.sum(), GAP_ESCAPE, dtype=np.uint8)
    out[np.cumsum(escapes + 1) - 1] = rests
    return out.tobytes()


def decode_gaps(data):
    gaps = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    gaps_so_far = np.cumsum(gaps)[gaps != GAP_ESCAPE]  # at the last byte of each position's gap
    return gaps_so_far + np.arange(len(gaps_so_far))


def position_streams(codes):
    """Every encoding of the stored weights' positions that fits the layer: {kind: bytes}."""
    flat = codes.flatten().numpy()
    stored = flat >= 0
    if stored.all():
        return {ALL: b""}
    return {GAPS: encode_gaps(np.flatnonzero(stored)), BITMASK: np.packbits(stored).tobytes()}


def decode_positions(kind, data, size):
    if kind == ALL:
        return np.arange(size)
    if kind == GAPS:
        return decode_gaps(data)
    if kind == BITMASK:
        return np.flatnonzero(np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=size))
    raise ValueError(f"unknown position encoding {kind}")


def compressed_size(data):
    return len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))


# The file -----------------------------------------------------------------------------

def encode(model):
    """The file's bytes for a model made by quantize()."""
    layers = common.linears(model)
    inputs = model[0].indices.cpu().numpy() if isinstance(model[0], common.KeepInputs) else np.zeros(0)
    body = [struct.pack(f"<B{len(layers) + 1}II", len(layers), *common.widths(model), len(inputs)),
            inputs.astype("<u4").tobytes()]
    for layer in layers:
        codebook, codes = shared_values(layer)
        streams = position_streams(codes)
        kind = min(streams, key=lambda k: compressed_size(streams[k]))
        stored = codes.flatten()[codes.flatten() >= 0]
        body += [struct.pack("<BHI", kind, len(codebook), len(streams[kind])), codebook.numpy().tobytes(),
                 layer.bias.detach().cpu().numpy().tobytes(), streams[kind],
                 struct.pack("<I", len(stored)), stored.to(torch.uint8).numpy().tobytes()]
    packed = lzma.compress(b"".join(body), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    return HEADER.pack(MAGIC, VERSION, len(packed), zlib.crc32(packed)) + packed


def decode(data):
    """The plain nn.Sequential stored in data; ValueError says what is wrong with it."""
    if len(data) < HEADER.size or data[:4] != MAGIC:
        raise ValueError("not a compressed model file of this project")
    _, version, length, crc = HEADER.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"format version {version}, this code reads version {VERSION}")
    packed = data[HEADER.size:]
    if len(packed) != length:
        raise ValueError(f"truncated or extended: the body is {len(packed):,} bytes, its header says {length:,}")
    if zlib.crc32(packed) != crc:
        raise ValueError("corrupted: its checksum does not match")
    body = memoryview(lzma.decompress(packed, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))
    offset = 0

    def read(size):
        nonlocal offset
        if offset + size > len(body):
            raise ValueError("corrupted: it ends inside a layer")
        offset += size
        return body[offset - size:offset]

    (n,) = struct.unpack("<B", read(1))
    *widths, n_inputs = struct.unpack(f"<{n + 1}II", read(4 * (n + 2)))
    inputs = torch.from_numpy(np.frombuffer(read(4 * n_inputs), dtype="<u4").astype(np.int64)) if n_inputs else None
    if inputs is not None and n_inputs != widths[0]:
        raise ValueError("corrupted: its input pixels do not fit the first layer")
    model = common.mlp(widths, inputs)
    with torch.no_grad():
        for layer in common.linears(model):
            kind, k, index_bytes = struct.unpack("<BHI", read(7))
            codebook = torch.from_numpy(np.frombuffer(read(4 * k), dtype="<f4").copy())
            bias = torch.from_numpy(np.frombuffer(read(4 * layer.out_features), dtype="<f4").copy())
            positions = decode_positions(kind, read(index_bytes), layer.weight.numel())
            (stored,) = struct.unpack("<I", read(4))
            codes = torch.from_numpy(np.frombuffer(read(stored), dtype=np.uint8).astype(np.int64))
            if stored != len(positions) or (positions >= layer.weight.numel()).any() or (codes >= k).any():
                raise ValueError("corrupted: its positions or codes do not fit the layer")
            weight = torch.zeros(layer.weight.numel())
            weight[torch.from_numpy(positions)] = codebook[codes]
            layer.weight.copy_(weight.view_as(layer.weight))
            layer.bias.copy_(bias)
    if offset != len(body):
        raise ValueError("corrupted: bytes left after the last layer")
    return model


def save_compressed(model, path):
    """Write a model made by quantize() to path, atomically; returns the file's size in bytes."""
    data = encode(model)
    files.atomic_write(path, lambda f: f.write(data))
    return len(data)


def load_compressed(path):
    """The model stored at path, predicting exactly as the quantized model saved there; a file
    that is not one, or is damaged, is refused with a one-line UserError."""
    try:
        with open(path, "rb") as f:
            return decode(f.read())
    except OSError as e:
        raise common.UserError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, struct.error, lzma.LZMAError) as e:
        raise common.UserError(f"{path} cannot be loaded: {e}") from None


# In a sweep ---------------------------------------------------------------------------

def compress(model, train_data, test_data, args, teacher, path, desc, dense_bytes):
    """Quantize a pruned model to args.bits, fine-tune its shared values when args.finetune_epochs,
    and save it to path: the row's accuracies, file size, and how many times smaller it is than
    the dense file of dense_bytes."""
    quantized = quantize(model, args.bits)
    row = {"quantized_accuracy": common.accuracy(quantized, test_data)}
    if args.finetune_epochs:
        common.finetune(quantized, train_data, args, args.finetune_epochs, teacher, desc)
        row["quantized_finetuned_accuracy"] = common.accuracy(quantized, test_data)
    row["compressed_bytes"] = save_compressed(quantized, path)
    row["times_smaller"] = dense_bytes / row["compressed_bytes"]
    return row


def columns(finetuned):
    percent = "{:.2f}%".format
    return [("Quantized", "quantized_accuracy", percent),
            *([("Q. Fine-tuned", "quantized_finetuned_accuracy", percent)] if finetuned else []),
            ("Compressed File (B)", "compressed_bytes", "{:,.0f}".format), ("x Smaller", "times_smaller", "{:.1f}".format)]


def note(bits):
    return (f"Compressed: {bits}-bit shared weight values per layer, positions and codes LZMA-coded "
            "(compressed.py); x Smaller is the dense file's size over it.")
