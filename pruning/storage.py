"""Model files that describe themselves, whatever their format: which format a file is and which
module reads it. The PyTorch file (torchfile.py: 'dense', 'csr') and the compressed file
(compressed.py) each record the architecture beside the numbers, so pruning.load rebuilds the
model from any of them; ONNX for other runtimes."""

import torch

from pruning import chain, compressed, torchfile
from pruning.files import WRITER, UserError, atomic_write, check_readable, shown
from pruning.torchfile import MAX_FILE_BYTES, csr_bytes_needed, read_torch_file, to_csr  # noqa: F401


def save(model, path, storage="dense", about=None, option=None):
    """Write model (any chain of layers this project handles) to path; returns the file's size.
    storage: 'dense', 'csr', or 'compressed' (a model made by compressed.quantize). about: a
    JSON-able dict stored with it (the training settings of a checkpoint, say)."""
    if storage == "compressed":
        return compressed.save_compressed(model, path, option)
    return torchfile.write(model, path, storage, about, option)


def load(path, with_about=False):
    """The model stored at path, in eval mode: a file of any of the project's formats. A file that
    is not one of ours, is damaged or claims an impossible architecture is refused with a one-line
    UserError. with_about: (model, the dict stored with it)."""
    check_readable(path, MAX_FILE_BYTES, "model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"MLPZ":
        model, about = compressed.load_compressed(path), {}
    elif magic == b"PK\x03\x04":
        model, about = torchfile.read(path)
    else:
        raise UserError(f"{shown(path)} is not a model file of this project")
    model.eval()
    return (model, about) if with_about else model


# Other runtimes -----------------------------------------------------------------------------

def export_onnx(model, path, example=None, option=None):
    """Write model as ONNX (opset of torch.onnx's exporter), input 'images' of any batch size,
    output 'logits'. example: one input (default: a raw MNIST image, for the project's models)."""
    import onnx  # noqa: F401 -- the exporter needs it; its absence is said in one line
    model = chain.sequential(model).eval()
    if example is None:
        example = torch.rand(2, 1, 28, 28)
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
