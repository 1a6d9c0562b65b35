"""The ONNX file, for other runtimes: the model exported by torch.onnx's exporter (dynamo), its
batch size free, marked as this project's by a metadata entry."""

import os
import warnings

import torch
import torch.nn as nn

from pruning import chain, graph
from pruning.files import WRITER, atomic_write


def export_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor | None = None) -> int:
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
    atomic_write(path, lambda f: f.write(data))
    return len(data)
