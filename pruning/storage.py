"""Model files that describe themselves, whatever their format: which format a file is and which
module reads it. The PyTorch file (torchfile.py: 'dense', 'csr') and the compressed file
(compressed.py) each record the architecture beside the numbers, so pruning.load rebuilds the
model from any of them; ONNX for other runtimes."""

import os
import warnings

import torch

from pruning import chain, compressed, exported, graph, torchfile
from pruning.files import WRITER, UserError, atomic_write, check_readable, shown
from pruning.model import MAX_PARAMS
from pruning.torchfile import MAX_FILE_BYTES, csr_bytes_needed, read_torch_file, to_csr  # noqa: F401


def save(model, path, storage="dense", *, about=None, option=None, bits=None):
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
        return compressed.save_compressed(model, path, option, dtype)
    if bits is not None:
        raise ValueError("bits is for storage='compressed'")
    return torchfile.write(model, path, storage, about, option)


DEFAULT_BITS = 5


def load(path, *, with_about=False, max_params=None):
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
    check_readable(path, torchfile.file_limit(max_params), "model file")
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


# Other runtimes -----------------------------------------------------------------------------

def export_onnx(model, path, example=None, *, option=None):
    """Write model as ONNX (opset of torch.onnx's exporter), input 'images' of any batch size,
    output 'logits'. example: a batch of inputs; without it, the input shape the model records
    (its input normalisation's, its kept pixels' image, or its first nn.Linear's inputs)."""
    import onnx  # noqa: F401 -- the exporter needs it; its absence is said in one line
    model = graph.network(model).eval()
    if example is None:
        shape = chain.input_shape(graph.layers_of(model))
        if shape is None:
            raise ValueError("export_onnx needs example=, a batch of the model's inputs: the model does not "
                             "record its input shape (it starts with neither nn.Linear nor Normalize)")
        example = torch.rand(2, *shape, dtype=next(model.parameters()).dtype)
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        warnings.warn("a bf16 model exports to ONNX, but onnxruntime's CPU provider does not run bf16 Gemm or Conv: "
                      "export model.float() to run it there", stacklevel=2)
    example = example[:2] if len(example) > 1 else torch.cat([example, example])
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.onnx.export(model, (example.cpu(),), dynamo=True, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "written_by", WRITER
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data), option)
    return len(data)
