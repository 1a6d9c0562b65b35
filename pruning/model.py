"""The networks and what they carry with them: the input normalisation, the input pixels kept,
and the counts every table reports."""

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MLP_SIZES = (784, 512, 256, 128, 10)
MAX_PARAMS = 10_000_000  # 40 MB of fp32 weights: far beyond any network here, far below the machine's memory


class Normalize(nn.Module):
    """The first layer of the project's models: raw images with values in [0, 1], shaped (N, 28, 28),
    (N, 1, 28, 28) or (N, 784), normalised and shaped as the next layer reads them."""

    def __init__(self, mean=MNIST_MEAN, std=MNIST_STD, shape=(784,)):
        super().__init__()
        self.mean, self.std, self.shape = float(mean), float(std), tuple(shape)

    def forward(self, x):
        if x.dim() == 0 or math.prod(x.shape[1:]) != math.prod(self.shape):
            raise ValueError(f"the model reads images of {math.prod(self.shape)} values, "
                             f"not of shape {tuple(x.shape[1:])}")
        return torch.sub(x.reshape(-1, *self.shape), self.mean).div_(self.std)  # one temporary, not two

    def extra_repr(self):
        return f"mean={self.mean}, std={self.std}, shape={self.shape}"


class KeepInputs(nn.Module):
    """The first layer of a model whose input pixels were pruned: of inputs of `size` values (whole
    images, of any shape), it keeps the pixels it indexes, before anything else is computed on them."""

    def __init__(self, indices, size=784):
        super().__init__()
        self.size = int(size)
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long))

    def forward(self, x):
        if x.dim() == 0 or math.prod(x.shape[1:]) != self.size:
            raise ValueError(f"the model reads images of {self.size} values, not of shape {tuple(x.shape[1:])}")
        return x.flatten(1).index_select(1, self.indices)

    def extra_repr(self):
        return f"{len(self.indices)} of {self.size} inputs"


def mlp(sizes=MLP_SIZES, inputs=None, size=784):
    """Fully connected ReLU network: sizes[0] inputs, sizes[-1] logits. With `inputs`, the indices
    of sizes[0] pixels, it takes whole images of `size` values and reads only those pixels."""
    layers = [KeepInputs(inputs, size)] if inputs is not None else []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def mnist_mlp(sizes: Sequence[int] = MLP_SIZES) -> nn.Sequential:
    """The MLP that takes raw MNIST images."""
    return nn.Sequential(Normalize(), *mlp(sizes))


def lenet5() -> nn.Sequential:
    """LeNet-5 as in Caffe: conv 20 5x5, max-pool, conv 50 5x5, max-pool, 800-500-10; 431,080 parameters."""
    return nn.Sequential(Normalize(shape=(1, 28, 28)),
                         nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


@contextlib.contextmanager
def evaluating(modules):
    """Within: every module of `modules` (a module or a list of them) in eval mode, as measuring
    wants it (BatchNorm reads its statistics and does not update them); after: each in the mode
    it had."""
    every = [m for module in (modules if isinstance(modules, (list, tuple)) else [modules])
             for m in module.modules()]
    modes = [m.training for m in every]
    for m in every:
        m.training = False
    try:
        yield modules
    finally:
        for m, mode in zip(every, modes):
            m.training = mode


def check_runs(model, x, refusal):
    """model run on x[:1] (a tensor of at least one input); its own error, if any, as one ValueError:
    `refusal`, then the error's kind and first line."""
    if not torch.is_tensor(x) or x.dim() < 1 or len(x) == 0:
        raise ValueError(f"{refusal}: give a tensor of at least one of the model's inputs")
    try:
        model(x[:1])
    except Exception as e:
        raise ValueError(f"{refusal} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)  # the layers whose weight every method prunes


def weighted(model: nn.Module) -> list[nn.Module]:
    """The layers whose weights are pruned: every nn.Linear and convolution (1d, 2d, 3d, transposed
    too), in order."""
    return [m for m in model.modules() if isinstance(m, WEIGHTED)]



def weight_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every weight matrix zero pruning ranks and zeroes, as (module, name) in the order of
    model.modules(): each weighted layer's weight, and nn.MultiheadAttention's input projections
    (in_proj_weight, packed, or q_proj_weight, k_proj_weight and v_proj_weight; its output
    projection is an nn.Linear of its own)."""
    out = []
    for m in model.modules():
        if isinstance(m, WEIGHTED):
            out.append((m, "weight"))
        elif isinstance(m, nn.MultiheadAttention):
            packed = m._qkv_same_embed_dim
            out += [(m, name) for name in (["in_proj_weight"] if packed else ["q_proj_weight", "k_proj_weight",
                                                                              "v_proj_weight"])]
    return out


def weight_matrices(model):
    """The tensors of weight_tensors(model), in its order."""
    return [getattr(m, name) for m, name in weight_tensors(model)]


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def kept_inputs(model: nn.Module) -> torch.Tensor:
    """The indices of the input pixels the model reads: all of them unless it holds KeepInputs."""
    keep = next((m for m in model.modules() if isinstance(m, KeepInputs)), None)
    if keep is not None:
        return keep.indices
    first = weighted(model)[0]
    return torch.arange(first.in_features if isinstance(first, nn.Linear) else first.in_channels,
                        device=first.weight.device)


def widths(model: nn.Module) -> tuple[int, ...]:
    """Input size followed by every weighted layer's output size, e.g. (784, 512, 256, 128, 10)."""
    layers = weighted(model)
    first = layers[0]
    return (first.in_features if isinstance(first, nn.Linear) else first.in_channels,
            *(m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in layers))


def count_weights(model: nn.Module) -> int:
    """The weights zero pruning may zero: those of weight_tensors(model)."""
    return sum(w.numel() for w in weight_matrices(model))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_zeros(model: nn.Module) -> int:
    """How many of count_weights(model) are zero."""
    return sum((w == 0).sum().item() for w in weight_matrices(model))


def mlp_params(sizes):
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
