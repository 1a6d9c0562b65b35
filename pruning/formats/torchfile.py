"""The PyTorch model file: its architecture (the input normalisation and kept pixels included)
beside its numbers, every weight ('dense') or each layer's weights as compressed sparse rows
('csr': fp32 values, int32 indices), read back only after every claim in it is checked."""

import contextlib
import io
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from pruning import architecture, chain, graph
from pruning.files import WRITER, UserError, atomic_write, read_torch_dict, shown
from pruning.model import weighted

FORMAT, VERSION = "pruning-model", 1


MAX_FILE_BYTES = architecture.file_limit()


def write(model, path, storage="dense", about=None):
    """Write model (any chain of layers this project handles) as a PyTorch file, storage 'dense' or
    'csr'; returns the file's size."""
    sequential = graph.network(model)
    description = architecture.describe(sequential)
    state = plain_state(sequential)
    if storage == "csr":
        dense_bytes = tensor_bytes(state)
        state = csr_tensors(sequential, state)
        if tensor_bytes(state) > dense_bytes:
            warnings.warn(LargerThanDense(f"{shown(path)}: its non-zeros as CSR take {tensor_bytes(state):,} B, more "
                                          f"than the {dense_bytes:,} B of every weight (CSR pays below about half "
                                          "zeros): storage='dense' is smaller"), stacklevel=3)
    elif storage != "dense":
        raise ValueError(f"storage must be 'dense', 'csr' or 'compressed', not {storage!r}")
    saved = {"format": FORMAT, "version": VERSION, "written_by": WRITER, "storage": storage,
             "architecture": description, "dtype": dtype_of(sequential), "tensors": state, "about": about or {}}
    buffer = io.BytesIO()  # written whole first: a full disk is then an OSError of ours, said in one line
    torch.save(saved, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    return Path(path).stat().st_size


class LargerThanDense(UserWarning):
    """A CSR file larger than the dense one would be."""


def tensor_bytes(state):
    return sum(t.numel() * t.element_size() for t in state.values())


def dtype_of(model):
    """The name of the floating-point type of model's weights (one for all)."""
    kinds = {p.dtype for p in model.parameters()}
    name = next((n for n, t in architecture.DTYPES.items() if kinds == {t}), None)
    if name is None:
        raise ValueError(f"the model's weights are of {', '.join(sorted(map(str, kinds)))}: one floating-point "
                         f"type of {', '.join(architecture.DTYPES)} is stored")
    return name


def plain_state(model):
    """The model's tensors by name, on the CPU, with any pruning mask still attached folded into its
    weight ('weight', not 'weight_orig' and 'weight_mask'): what the file's reader expects."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name in [k for k in state if k.endswith("_orig")]:
        base = name.removesuffix("_orig")
        if base + "_mask" in state:
            state[base] = state.pop(name) * state.pop(base + "_mask")
    return state


def to_csr(weight):
    """CSR with int32 indices of a weight seen as (outputs, everything else)."""
    with sparse_quietly():
        csr = weight.detach().cpu().flatten(1).to_sparse_csr()
        return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape,
                                       check_invariants=True)


@contextlib.contextmanager
def sparse_quietly():
    """Without PyTorch's notices that sparse tensors are in beta (for this block only)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
        yield


def csr_tensors(model, state):
    """Every weight as CSR, all layers' indices in one int32 tensor and all their values in one fp32
    tensor (the file's framing stays small); the other tensors as they are."""
    names = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, chain.WEIGHTED)]
    weights = [to_csr(state[name]) for name in names]
    return {"indices": torch.cat([t for w in weights for t in (w.crow_indices(), w.col_indices())]),
            "values": torch.cat([w.values() for w in weights]),
            **{k: v for k, v in state.items() if k not in names}}


def csr_bytes_needed(model: nn.Module) -> int:
    """The least any CSR file of model holds: fp32 values, int32 indices and row pointers, fp32 biases."""
    return sum(8 * layer.weight.count_nonzero().item() + 4 * (layer.weight.shape[0] + 1) + 4 * layer.weight.shape[0]
               for layer in weighted(model))


# Reading ----------------------------------------------------------------------------------

def read_torch_file(path, max_params=architecture.MAX_PARAMS):
    """The dict a model file of ours holds, checked before anything of its claimed size is allocated."""
    saved = read_torch_dict(path, architecture.file_limit(max_params), "model file")
    if saved.get("format") != FORMAT:
        raise UserError(f"{shown(path)} is not a model file of this project")
    if saved.get("version") != VERSION:
        raise UserError(f"{shown(path)} is of format version {architecture.brief(saved.get('version'))}; "
                        f"this code reads {VERSION}")
    return saved


def read(path, max_params=architecture.MAX_PARAMS):
    """(model, the dict stored with it) of a PyTorch model file of ours, in the dtype it was saved in."""
    saved = read_torch_file(path, max_params)
    try:
        model = from_tensors(saved, max_params)
    except KeyError as e:
        raise UserError(f"{shown(path)} cannot be loaded: it lacks its {e.args[0]!r}") from None
    except (architecture.BadArchitecture, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{shown(path)} cannot be loaded: {e}") from None
    return model, saved.get("about") if isinstance(saved.get("about"), dict) else {}


def from_tensors(saved, max_params=architecture.MAX_PARAMS):
    description, tensors = saved["architecture"], saved["tensors"]
    dtype = saved.get("dtype", "float32")  # files written before the dtype was recorded: fp32
    if not isinstance(dtype, str) or dtype not in architecture.DTYPES:
        raise ValueError(f"its dtype {architecture.brief(dtype)} is not one of {', '.join(architecture.DTYPES)}")
    meta = architecture.build(description, "meta", max_params)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    check_tensors(tensors, saved["storage"])
    if saved["storage"] == "csr":
        weights = [f"{name}.weight" for name, m in meta.named_modules() if isinstance(m, chain.WEIGHTED)]
        tensors = dense_from_csr(weights, tensors, shapes)
    elif saved["storage"] != "dense":
        raise ValueError(f"unknown storage {saved['storage']!r}")
    if tensors.keys() != shapes.keys() or any(tensors[k].shape != s for k, s in shapes.items()):
        raise ValueError("its tensors do not fit its architecture")
    model = architecture.build(description, max_params=max_params).to(architecture.DTYPES[dtype])
    model.load_state_dict(tensors)
    architecture.check_model(model)
    return model


FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
NUMBERS = {"dense": (*FLOATS, torch.int64), "csr": (*FLOATS, torch.int32, torch.int64)}


def check_tensors(tensors, storage):
    """Refuse tensors that are not plain dense arrays of the file's own types, or that claim more
    elements than the bytes they were read from (a stride of 0): before anything converts them."""
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError("its tensors are not tensors")
    for name, t in tensors.items():
        if t.layout != torch.strided or t.device.type != "cpu" or t.dtype not in NUMBERS.get(storage, ()):
            raise ValueError(f"its tensor {architecture.brief(name)} is not a plain array of numbers "
                             f"({t.dtype}, {t.layout}, {t.device.type})")
        if not t.is_contiguous() or t.untyped_storage().nbytes() < t.numel() * t.element_size():
            raise ValueError(f"its tensor {architecture.brief(name)} claims more numbers than it holds")


def dense_from_csr(weights, tensors, shapes):
    """The dense tensors of a CSR file: the weights named (in the writer's order) from the file's
    shared indices and values, the others as they are."""
    indices, values = tensors.get("indices"), tensors.get("values")
    if indices is None or values is None or indices.dim() != 1 or values.dim() != 1:
        raise ValueError("its sparse weights are missing")
    indices = indices.long()
    out = {k: v for k, v in tensors.items() if k not in ("indices", "values")}
    for name in weights:
        rows, columns = shapes[name][0], math.prod(shapes[name][1:])
        crow, indices = indices[:rows + 1], indices[rows + 1:]
        if len(crow) != rows + 1:
            raise ValueError("its sparse weights end early")
        nnz = crow[-1].item()
        if not 0 <= nnz <= min(len(indices), len(values), rows * columns):
            raise ValueError("its sparse weights do not fit their layers")
        col, indices, vals, values = indices[:nnz], indices[nnz:], values[:nnz], values[nnz:]
        with sparse_quietly():
            out[name] = torch.sparse_csr_tensor(crow, col, vals, (rows, columns), check_invariants=True) \
                .to_dense().view(shapes[name])
    if len(indices) or len(values):
        raise ValueError("numbers are left after the last layer")
    return out
