"""Model files, one module per format, and the three calls that choose among them:

    save(model, path, storage)   'dense' or 'csr': torchfile.py, PyTorch's zip file
                                 'compressed': compressed.py, shared values and LZMA-coded positions
    load(path)                   any of those, or a torch.export file (.pt2: exported.py), by its content
    export_onnx(model, path)     ONNX for other runtimes: onnxfile.py

Every file records the architecture as data beside the numbers (pruning/architecture.py), no
pickled code, so load rebuilds the model; what any file's model must be (its size, finite numbers,
its dtype) is checked there too."""

import os

import torch.nn as nn

from pruning import architecture, graph
from pruning.files import UserError, check_readable, shown
from pruning.formats import compressed, exported, torchfile
from pruning.formats.onnxfile import export_onnx
from pruning.formats.torchfile import csr_bytes_needed
from pruning.model import MAX_PARAMS

__all__ = ["save", "load", "export_onnx", "csr_bytes_needed"]


def save(model: nn.Module, path: str | os.PathLike, storage: str = "dense", *, about: dict | None = None,
         bits: int | None = None) -> int:
    """Write model (any chain of layers this project handles) to path; returns the file's size.
    storage: 'dense' (every weight, in the model's dtype), 'csr' (the non-zeros), or 'compressed'
    (each layer's weights shared among 2^bits values, bits 5 unless given: lossy, and what loads
    is exactly the quantized model; a model made by compressed.quantize is written as it is).
    about: a JSON-able dict stored with it (the training settings of a checkpoint, say)."""
    if storage == "compressed":
        if bits is not None and (type(bits) is not int or not 1 <= bits <= 8):
            raise ValueError(f"bits must be a whole number from 1 to 8, not {bits!r}")
        dtype = torchfile.dtype_of(model)
        if not compressed.is_quantized(model) or bits is not None:
            model = compressed.quantize(graph.network(model), bits or DEFAULT_BITS)
        return compressed.save_compressed(model, path, dtype)
    if bits is not None:
        raise ValueError("bits is for storage='compressed'")
    return torchfile.write(model, path, storage, about)


DEFAULT_BITS = 5


def load(path: str | os.PathLike, *, with_about: bool = False,
         max_params: int | None = None) -> nn.Module | tuple[nn.Module, dict]:
    """The model stored at path, in eval mode and the dtype it was saved in: a file of any of the
    project's formats, or a torch.export file (.pt2, an ExportedProgram), rebuilt as layers. A file
    that is not one of ours, is damaged or claims an impossible
    architecture, or more parameters than its size justifies, is refused with a one-line UserError.

    Args:
        path: a file save() wrote.
        with_about: return (model, the dict stored with it).
        max_params: the most parameters to build; by default what the file's size can hold
            (PARAMS_PER_BYTE a byte, at least MAX_PARAMS): every file save() writes loads, and a
            small crafted file cannot claim gigabytes.

    Example:
        >>> model = pruning.load("net.pt")
    """
    if max_params is None:
        max_params = params_justified(path)
    if type(max_params) is not int or max_params < 1:
        raise ValueError(f"max_params must be a positive whole number, not {max_params!r}")
    check_readable(path, architecture.file_limit(max_params), "model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"MLPZ":
        model, about = compressed.load_compressed(path, max_params), {}
    elif magic == b"PK\x03\x04" and exported.is_exported(path):
        model, about = exported.load_exported(path), {}
    elif magic == b"PK\x03\x04":
        model, about = torchfile.read(path, max_params)
    else:
        raise UserError(f"{shown(path)} is not a model file of this project")
    model.eval()
    return (model, about) if with_about else model


PARAMS_PER_BYTE = 256  # parameters a byte of a file may claim: a compressed file of 99.9% zeros holds fewer
MOST_PARAMS = 2_000_000_000  # 8 GB of fp32 weights: the most any file may claim


def params_justified(path):
    """The parameters a file of path's size may hold: PARAMS_PER_BYTE a byte, MAX_PARAMS at least."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return MAX_PARAMS  # check_readable says why in one line
    return min(MOST_PARAMS, max(MAX_PARAMS, PARAMS_PER_BYTE * size))
