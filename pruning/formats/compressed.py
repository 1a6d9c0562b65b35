"""The compressed model file: each layer's weights shared among 2^B values found by k-means,
the positions of the non-zero weights as gaps or a bitmask, all entropy-coded by LZMA
(Deep Compression, Han et al. 2016, with LZMA in place of Huffman coding).

File: magic b"MLPZ", format version (1 byte), body length and CRC-32 of the body (4 bytes each,
little-endian), then the body, an LZMA2 raw stream of: the dtype the model loads in (1 byte, an
index into architecture.DTYPES; version 3 on, version 2 loads in fp32), the architecture as JSON (its length in 4
bytes first; architecture.py), then per layer with weights its position encoding, its shared values
(fp16), its positions and one code (a byte) per stored weight, then every other number of the
model (biases and the like as fp16, the kept pixels' indices as int32) in the order of its state.
Every fp16 number is rounded so in the model before it is measured (to_file_precision).
"""

import json
import lzma
import struct
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from pruning import architecture, chain, graph, surgery
from pruning.files import UserError, atomic_write, check_readable, shown
from pruning.model import weighted

MAGIC, VERSION = b"MLPZ", 3
READS = (2, 3)  # the versions this code reads
MAX_DESCRIPTION = 1 << 20
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
    that trains: each shared value's gradient is the sum of those of the weights that share it.
    The weights are gathered with index_select, whose gradient (index_add_) sums in one order every
    run; indexing's (index_put_ with accumulate) sums in an order that varies from run to run on a
    CPU, and is slower."""

    def __init__(self, codebook, codes):
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("codes", codes)

    def forward(self, _):
        return F.pad(self.codebook, (1, 0)).index_select(0, self.codes.flatten() + 1).view(self.codes.shape)


def quantize(model, bits):
    """A copy of model, in fp32, whose layers share at most 2^bits weight values each; zeros stay
    zero unless no weight of the layer is zero, when all are shared. Pruning masks
    (torch.nn.utils.prune's) are folded into the weights of the copy first."""
    quantized = surgery.make_permanent(surgery.copy_of(model)).float()
    for layer in weighted(quantized):
        weight = layer.weight.detach()
        stored = weight != 0 if (weight == 0).any() else torch.ones_like(weight, dtype=torch.bool)
        codes = torch.full(weight.shape, -1, dtype=torch.long, device=weight.device)
        codebook = torch.zeros(0)
        if stored.any():
            codebook, codes[stored] = kmeans(weight[stored].cpu(), 2 ** bits)
        parametrize.register_parametrization(layer, "weight", SharedWeights(codebook.to(weight.device), codes),
                                             unsafe=True)
    return to_file_precision(quantized)


@torch.no_grad()
def to_file_precision(model):
    """Round the numbers a compressed file stores (shared values, biases, BatchNorm's) to fp16, as
    the file holds them, so that the model measured is the model that loads; returns model.
    Call it again after fine-tuning the shared values."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not name.endswith("parametrizations.weight.original"):
            tensor.copy_(tensor.half().float())
    return model


def is_quantized(model):
    """Whether model's weighted layers share their values (a model quantize made)."""
    return any(parametrize.is_parametrized(layer, "weight") for layer in weighted(model))


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

def encode(model, dtype="float32"):
    """The file's bytes for a model made by quantize(), to load in dtype (a name of architecture.DTYPES)."""
    model = graph.network(model)
    description = json.dumps(architecture.describe(model), separators=(",", ":")).encode()
    body = [bytes([list(architecture.DTYPES).index(dtype)]), struct.pack("<I", len(description)), description]
    shared = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, chain.WEIGHTED)}
    for layer in weighted(model):
        codebook, codes = shared_values(layer)
        streams = position_streams(codes)
        kind = min(streams, key=lambda k: compressed_size(streams[k]))
        stored = codes.flatten()[codes.flatten() >= 0]
        body += [struct.pack("<BHI", kind, len(codebook), len(streams[kind])),
                 codebook.numpy().astype("<f2").tobytes(), streams[kind],
                 struct.pack("<I", len(stored)), stored.to(torch.uint8).numpy().tobytes()]
    for name, tensor in plain_state(model).items():
        if name not in shared:
            body.append(tensor.detach().cpu().numpy().astype("<f2" if tensor.is_floating_point() else "<i4").tobytes())
    packed = lzma.compress(b"".join(body), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    return HEADER.pack(MAGIC, VERSION, len(packed), zlib.crc32(packed)) + packed


def plain_state(model):
    """The state of a model whose layers may be quantized, under the names of the plain model's."""
    return {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in model.state_dict().items()
            if ".parametrizations.weight.0." not in k}


class Body:
    """The decompressed body, read in order, never past a bound on its size."""

    def __init__(self, packed):
        self.decompressor = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=LZMA_FILTERS)
        self.packed, self.data, self.offset = packed, b"", 0

    def read(self, size, limit):
        """The next `size` bytes; the whole body may not exceed `limit` bytes."""
        need = self.offset + size
        if need > limit:
            raise ValueError("corrupted: it claims more than its architecture holds")
        if need > len(self.data) and not self.decompressor.eof:
            self.data += self.decompressor.decompress(self.packed, max_length=need - len(self.data))
            self.packed = b""
        if need > len(self.data):
            raise ValueError("corrupted: it ends inside a layer")
        self.offset = need
        return memoryview(self.data)[need - size:need]

    def finished(self):
        return self.offset == len(self.data) and (self.decompressor.eof or not self.decompressor.decompress(
            b"", max_length=1))


def body_limit(description_bytes, model):
    """The most bytes a body of this architecture can hold."""
    weights = sum(layer.weight.numel() for layer in weighted(model))
    others = sum(t.numel() for t in model.state_dict().values()) - weights
    return 4 + description_bytes + sum(16 + 4 * 256 + 3 * layer.weight.numel() for layer in weighted(model)) \
        + 4 * others


def decode(data, max_params=architecture.MAX_PARAMS):
    """The plain nn.Sequential stored in data; ValueError says what is wrong with it."""
    if len(data) < HEADER.size or data[:4] != MAGIC:
        raise ValueError("not a compressed model file of this project")
    _, version, length, crc = HEADER.unpack_from(data)
    if version not in READS:
        raise ValueError(f"format version {version}, this code reads versions {READS[0]} to {READS[-1]}")
    packed = data[HEADER.size:]
    if len(packed) != length:
        raise ValueError(f"truncated or extended: the body is {len(packed):,} bytes, its header says {length:,}")
    if zlib.crc32(packed) != crc:
        raise ValueError("corrupted: its checksum does not match")
    body = Body(packed)
    dtype = "float32"
    if version >= 3:
        (code,) = body.read(1, 1 + 4 + MAX_DESCRIPTION)
        if code >= len(architecture.DTYPES):
            raise ValueError(f"corrupted: dtype {code} is not one of {len(architecture.DTYPES)}")
        dtype = list(architecture.DTYPES)[code]
    first = 1 if version >= 3 else 0
    (n,) = struct.unpack("<I", body.read(4, first + 4 + MAX_DESCRIPTION))
    try:
        description = json.loads(bytes(body.read(n, first + 4 + MAX_DESCRIPTION)))
    except (ValueError, RecursionError):
        raise ValueError("corrupted: its architecture is not readable") from None
    shapes = architecture.build(description, "meta", max_params)  # checks every claim, allocating nothing
    limit = first + body_limit(n, shapes)
    model = architecture.build(description, max_params=max_params)
    shared = set()
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, chain.WEIGHTED):
                continue
            shared.add(f"{name}.weight")
            kind, k, index_bytes = struct.unpack("<BHI", body.read(7, limit))
            codebook = torch.from_numpy(np.frombuffer(body.read(2 * k, limit), dtype="<f2").astype(np.float32))
            positions = decode_positions(kind, body.read(index_bytes, limit), layer.weight.numel())
            (stored,) = struct.unpack("<I", body.read(4, limit))
            codes = torch.from_numpy(np.frombuffer(body.read(stored, limit), dtype=np.uint8).astype(np.int64))
            if stored != len(positions) or (positions >= layer.weight.numel()).any() or (codes >= k).any():
                raise ValueError("corrupted: its positions or codes do not fit the layer")
            weight = torch.zeros(layer.weight.numel())
            weight[torch.from_numpy(positions)] = codebook[codes]
            layer.weight.copy_(weight.view_as(layer.weight))
        for name, tensor in model.state_dict().items():
            if name not in shared:
                kind = "<f2" if tensor.is_floating_point() else "<i4"
                values = np.frombuffer(body.read(int(kind[-1]) * tensor.numel(), limit), dtype=kind).astype(
                    np.float32 if tensor.is_floating_point() else np.int64)
                tensor.copy_(torch.from_numpy(values).view_as(tensor))
    if not body.finished():
        raise ValueError("corrupted: bytes left after the last layer")
    architecture.check_model(model)
    return model.to(architecture.DTYPES[dtype])


def save_compressed(model, path, dtype="float32"):
    """Write a model made by quantize() to path, atomically, to load in dtype; returns the file's size
    in bytes."""
    data = encode(model, dtype)
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def load_compressed(path, max_params=architecture.MAX_PARAMS):
    """The model stored at path, predicting exactly as the quantized model saved there; a file
    that is not one, or is damaged, is refused with a one-line UserError."""
    try:
        check_readable(path, architecture.file_limit(max_params), "compressed model file")
        with open(path, "rb") as f:
            return decode(f.read(), max_params)
    except OSError as e:
        raise UserError(f"cannot read {shown(path)}: {e.strerror}") from None
    except (ValueError, TypeError, struct.error, lzma.LZMAError, architecture.BadArchitecture) as e:
        reason = " ".join(str(e).split())[:200]  # one line, of a readable length
        raise UserError(f"{shown(path)} cannot be loaded: {reason}") from None
    except RecursionError:
        raise UserError(f"{shown(path)} cannot be loaded: its description is nested too deeply") from None
