"""The pieces of a plan for_inference times: a chain's last run of fully connected layers (or all
of it from its first convolution, lowering.py) split off, each layer run as PyTorch runs it
(Dense) or through the kernel (KernelLayers: its non-zeros, or every weight), the run wrapped as
a Prepared model that falls back to the model as given for inputs it was not planned for; and
the timing that chooses among plans (tiles, threads, the fastest by a margin)."""

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.modules.module as module_hooks
import torch.nn.utils.prune as prune

from pruning import chain, lowering
from pruning.kernels import NONE, RELU, TILES
from pruning.lowering import Lowered, lowerable
from pruning.measure import in_turn
from pruning.model import KeepInputs, Normalize
from pruning.packing import KernelLayers

SKIPPED = (nn.Dropout, nn.Identity)  # nothing in eval mode
WAYS = ("dense", "sparse", "rows")  # how a layer runs: PyTorch, the kernel on its non-zeros, the kernel on every weight
# (a lowered convolution: 'sparse' as rows, 'strips' as strips; a pooling: 'max')
MARGIN = 1.05  # a faster plan is taken only when at least this much faster: timing noise is not speed
MAX_BATCH = 1 << 20
ROWS_ABOVE = {1: 0.25, "more": 0.5}  # density from which the kernel runs a layer faster whole than by its
# non-zeros, at batch 1 and above (a 512-256 layer on a Xeon: 25% at 1, 50% at 32, 40% at 2,048; speed.md)
DENSE_ABOVE = 0.5  # density from which a layer is tried in PyTorch (dense) beside the kernel
GLOBAL_HOOKS = (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks,
                module_hooks._global_backward_hooks, module_hooks._global_backward_pre_hooks)  # the dicts
# torch.nn.modules.module.register_module_forward_hook and its kin add to (and their handles remove from)
CALIBRATION = 10000  # the most inputs a plan is timed on: a larger batch is more tiles of the same (a
# smaller one may sit in a cache the batch asked for does not)


class Dense(nn.Module):
    """A fully connected layer and its activation, as PyTorch runs them."""

    def __init__(self, linear, activation):
        super().__init__()
        self.linear, self.relu = linear, activation == RELU

    def forward(self, x):
        y = self.linear(x)
        return y.relu_() if self.relu else y


class Prepared(nn.Module):
    """The model as planned: `before` (PyTorch layers; empty where the kernel reads the input
    itself), then `steps`, each a Dense layer or KernelLayers; `layers` holds the run's nn.Linear
    layers, so that the prepared model's parameters and state_dict are the model's. Inputs it was
    not planned for (not fp32 on the CPU, of another shape, needing gradients, or traced) go to the
    model as given, which also raises the model's own errors. `summary` says which layers run
    where."""

    def __init__(self, before, steps, shape, loose, given, ways, what="fully connected layers"):
        super().__init__()
        self.before, self.runs_before = before, len(before) > 0
        self.steps = list(steps)  # a plain list: the kernel's steps are not modules
        self.one_call = not self.runs_before and len(self.steps) == 1 and type(self.steps[0]) is KernelLayers
        self.layers = nn.ModuleList(linear for step in steps for linear in step_linears(step))
        self.shape, self.loose, self.inputs, self.ways = tuple(shape), loose, math.prod(shape), ways
        self.given = [given]  # in a list: not a submodule
        self.summary = summary(ways, self.runs_before, what) + (
            "; one image's first layer by the columns of its inputs not zero, where at most half are"
            if self.one_call and self.steps[0].by_columns else "")
        self.hook_tables = [table for layer in self.layers for m in layer.modules()
                            for table in (m._forward_hooks, m._forward_pre_hooks)]
        self.hooks_planned = self.hooks()
        self.unhooked = self.hooks_planned == 0
        self.images = {(1, *self.shape), *([(1, self.inputs)] if loose else [])} if self.one_call else set()
        self.watched = [self._forward_hooks, self._forward_pre_hooks, self._backward_hooks, self._backward_pre_hooks,
                        *self.hook_tables]  # none holds a hook, nor GLOBAL_HOOKS: one image goes straight through

    def hooks(self):
        """How many forward hooks the run's layers hold (a pruning mask's among them)."""
        return sum(map(len, self.hook_tables))

    def __call__(self, *args, **kwargs):
        """nn.Module's call, straight to forward where nothing else would run (no hook, global or
        the model's own; not compiled or traced), and for one image of a model that is one kernel
        call, straight to the kernel: a call of one image takes microseconds, and this saves one."""
        if self.images and len(args) == 1 and not kwargs:
            x = args[0]
            if (type(x) is torch.Tensor and (x.shape in self.images or self.image_shaped(x))
                    and x.dtype is torch.float32 and x.is_cpu and x.layout is torch.strided
                    and not x.requires_grad and x.is_contiguous() and self.unhooked and not any(self.watched)
                    and not any(GLOBAL_HOOKS) and self._compiled_call_impl is None and not torch._C._is_tracing()
                    and not torch.compiler.is_compiling()):  # planned_for's checks, and nn.Module's
                return self.steps[0].image(x)
        if (kwargs or len(args) != 1 or self._compiled_call_impl is not None or self._forward_hooks
                or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks or any_global_hook()
                or torch.jit.is_tracing()):
            return super().__call__(*args, **kwargs)
        return self.forward(args[0])

    def image_shaped(self, x):
        """Whether x is one image of the planned size in a shape not seen before (where the model reshapes
        its input: (1, 1, 28, 28) as well as (1, 784)); if so, its shape is remembered."""
        if self.loose and x.dim() > 1 and x.shape[0] == 1 and x.numel() == self.inputs:
            self.images.add(x.shape)
            return True
        return False

    def planned_for(self, x):
        """Whether x is a batch this plan computes: a plain fp32 tensor on the CPU with no gradient,
        each input of the planned shape (of its size, where the model reshapes its input), not traced
        or compiled, and no hook registered on the layers since planning (measure.flops', say: the
        model as given runs it). One expression: batch 1 takes microseconds."""
        return (type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu and x.layout is torch.strided
                and not x.requires_grad and x.dim() > 1
                and (sized(x, self.inputs) if self.loose else x.shape[1:] == self.shape)
                and (not any(self.hook_tables) if self.unhooked else self.hooks() == self.hooks_planned)
                and not (torch.jit.is_tracing() or torch.compiler.is_compiling()))

    def forward(self, x):
        """Its weights need no gradient and x none, so nothing here records one."""
        if not self.planned_for(x):
            return self.given[0](x)
        if self.one_call and x.is_contiguous():  # the whole model one kernel call: nothing else to run
            return self.steps[0].run(x)
        h = x if not self.runs_before and x.is_contiguous() else self.before(x).flatten(1).contiguous()
        for step in self.steps:  # the kernel's inputs checked above: planned_for and contiguous
            h = step.run(h) if type(step) is KernelLayers else step(h)
        return h

    def extra_repr(self):
        return "\n".join(repr(s) for s in self.steps if not isinstance(s, nn.Module))


def sized(x, inputs):
    """Whether each input of the batch x holds `inputs` values."""
    values = x.numel()
    return values == x.shape[0] * inputs if values else math.prod(x.shape[1:]) == inputs


def any_global_hook():
    """Whether a hook registered for every module (torch.nn.modules.module.register_module_forward_hook
    and its kin) would run."""
    return any(GLOBAL_HOOKS)


def plain(x):
    """Whether x is what the kernel is planned for: a plain fp32 tensor on the CPU with no gradient,
    not traced or compiled."""
    return (type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu and not x.requires_grad
            and not (torch.jit.is_tracing() or torch.compiler.is_compiling()))


def calibration(count, shape):
    """The random inputs plans are timed on: count of them, each of `shape`, the same every call."""
    return torch.rand(count, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32, device="cpu")


def step_linears(step):
    return [step.linear] if isinstance(step, Dense) else [linear for linear, _ in step.arguments[0]]


def summary(ways, runs_before, what="fully connected layers"):
    """Which of the model's last layers (`what`: its last fully connected ones, or all from its first
    convolution) run where, in words."""
    where = ", ".join(f"{k}: {w}" for k, w in enumerate(ways))
    head = "PyTorch runs the layers before them; " if runs_before else ""
    return (f"{head}{what} ({where}; dense = PyTorch, sparse = the kernel on the non-zeros, "
            "rows = the kernel on every weight, strips = the kernel's sparse convolution, max = the kernel's "
            "max-pooling)")


def split(layers):
    """The chain `layers` as (what comes before its last run of fully connected layers, that run as
    [(nn.Linear, activation code)]): each nn.Linear may be followed by a ReLU and by layers that do
    nothing in eval mode. None where the chain does not end in such a run."""
    start = len(layers)
    while start > 0 and as_written(layers[start - 1], (nn.Linear, nn.ReLU) + SKIPPED):
        start -= 1
    while start < len(layers) and not as_written(layers[start], nn.Linear):
        start += 1
    if start == len(layers):
        return None
    run = []
    for m in layers[start:]:
        if isinstance(m, nn.Linear):
            run.append((m, NONE))
        elif isinstance(m, nn.ReLU):
            run[-1] = (run[-1][0], RELU)  # relu(relu(x)) is relu(x)
    return layers[:start], run


def as_written(module, kinds):
    """Whether module is one of kinds and computes what that kind does: its forward PyTorch's own
    (a subclass may compute something else). Hooks are for_inference's check, on the whole model."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    kind = next((k for k in kinds if isinstance(module, k)), None)
    return kind is not None and type(module).forward is kind.forward


def hooked(module):
    """Whether a hook runs when module does, other than a pruning mask's (which only computes the
    weight the kernel reads, as a parametrization does)."""
    pre = [h for h in module._forward_pre_hooks.values() if not isinstance(h, prune.BasePruningMethod)]
    return bool(pre or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks)


def gather(before, first):
    """How the kernel reads the model's input when all that comes before the first nn.Linear is the
    kept pixels and the input normalisation (and a flatten), each element-wise: (the columns of the
    flattened input that some weight reads, shift, scale, those columns' positions in the first
    layer's input, the columns the first layer reads at all: None for all). None where PyTorch must
    run them."""
    if any(not as_written(m, (Normalize, KeepInputs, nn.Flatten) + SKIPPED) for m in before):
        return None
    normalize = [m for m in before if isinstance(m, Normalize)]
    keep = [m for m in before if isinstance(m, KeepInputs)]
    if len(normalize) > 1 or len(keep) > 1:
        return None
    read = (torch.arange(first.in_features) if isinstance(first, Lowered)
            else first.weight.detach().ne(0).any(0).cpu().nonzero().squeeze(1))
    columns = keep[0].indices.cpu()[read] if keep else read
    shift, scale = (normalize[0].mean, normalize[0].std) if normalize else (0.0, 1.0)
    checked = keep[0].indices.cpu().numpy() if keep else None  # what the model's first layer reads
    return columns.numpy(), shift, scale, read.numpy(), checked


def input_shape(layers, example):
    """The shape of one input: the example's, else what the first layer reads."""
    if example is not None:
        return tuple(example.shape[1:])
    shape = chain.input_shape(layers)
    if shape is not None:
        return shape
    raise ValueError("for_inference needs example=, a batch of inputs of the model, for a model that does not "
                     "start with nn.Linear or this project's Normalize or KeepInputs")


def lowered(layers, shape):
    """The chain `layers` as (what comes before its first convolution, everything from there
    as [(layer, activation code)], convolutions and poolings as lowering.Lowered), where the kernel
    can run all of it: convolutions and max-poolings it lowers, each maybe followed by a ReLU, an
    nn.Flatten, then fully connected layers to the end. None where it cannot."""
    start = next((k for k, m in enumerate(layers) if type(m) is nn.Conv2d), None)
    if start is None:
        return None
    flatten = [k for k, m in enumerate(layers[start:], start) if as_written(m, nn.Flatten)]
    if len(flatten) != 1 or not flattens(layers[flatten[0]]):
        return None
    tail = split(layers[flatten[0] + 1:])
    if tail is None or tail[0]:  # the flatten must lead straight into the fully connected run
        return None
    middle = layers[start:flatten[0]]
    if not all(lowerable(m) or as_written(m, (nn.ReLU,) + SKIPPED) for m in middle):
        return None
    before = layers[:start]
    with torch.no_grad():
        shape = nn.Sequential(*before)(torch.zeros(1, *shape, dtype=torch.float32, device="cpu")).shape[1:]
    run = []
    for m in middle:
        if lowerable(m):
            if len(shape) != 3:
                return None
            layer = Lowered(m, shape)
            if layer.entries() > lowering.MAX_STORED:
                return None
            run.append((layer, NONE))
            shape = layer.out_shape
        elif isinstance(m, nn.ReLU):
            if not run:
                return None
            run[-1] = (run[-1][0], RELU)
    return before, run + tail[1]


def ways_of(run, batch):
    """How the kernel stores each layer of a run: a max-pooling's windows ('max'), an average
    pooling's as rows of weights 1 / window ('sparse'), a convolution's non-zeros in strips of
    outputs along the image's rows ('strips'), a fully connected layer by its density (way)."""
    lowered = {nn.MaxPool2d: "max", nn.AvgPool2d: "sparse", nn.Conv2d: "strips"}
    return [lowered[type(layer.module)] if isinstance(layer, Lowered) else way(layer, batch) for layer, _ in run]


def flattens(layer):
    """Whether layer is a flatten that keeps the batch (the kernel's rows are flat already)."""
    return as_written(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1


def plan(before, run, ways, folded, shape, loose, given, packed=None, what="fully connected layers"):
    """A Prepared model whose layers of `run` run as `ways` says (one of WAYS each, 'strips' for a
    convolution, or 'max' for a pooling); packed: the layers stored for the kernel so far
    (KernelLayers)."""
    steps, i = [], 0
    while i < len(run):
        if ways[i] == "dense":
            steps.append(Dense(*run[i]))
            i += 1
            continue
        j = next((k for k in range(i, len(run)) if ways[k] == "dense"), len(run))
        reads_input = i == 0 and folded is not None
        inputs, gathered = (math.prod(shape), folded) if reads_input else (run[i][0].in_features, ())
        whole = [w in ("rows", "strips") for w in ways[i:j]]
        steps.append(KernelLayers(run[i:j], whole, inputs, *gathered, packed=packed))
        i = j
    reads_input = ways[0] != "dense" and folded is not None
    return Prepared(nn.Sequential() if reads_input else nn.Sequential(*before), steps, shape, loose, given,
                    ways, what).eval()


def fastest(candidates, x):
    """The fastest of candidates on x, the first (the incumbent) unless another beats it by MARGIN."""
    times = in_turn(candidates, x)
    return candidates[min(range(len(candidates)), key=lambda k: times[k] * (MARGIN if k else 1))]


def tilings(batch, threads):
    """(tile, threads) to try for the kernel at this batch size: tiles no wider than twice the
    batch, the batch in one thread or shared among `threads`."""
    if batch == 1:
        return [(1, 1)]
    tiles = [tile for tile in TILES[1:] if tile < 2 * batch] or [TILES[1]]
    return [(tile, 1) for tile in tiles] + [(tile, threads) for tile in tiles if 1 < threads and tile < batch]


def as_given(given, why):
    """The model as given, saying why (a warning, and its `summary`)."""
    warnings.warn(f"for_inference returns the model as given: {why}", stacklevel=4)
    given.summary = f"the model as given, in PyTorch: {why}"
    return given


def chosen(given):
    """The model as given, where it was timed the fastest."""
    given.summary = "the model as given, in PyTorch: timed faster here than every plan in the kernel"
    return given


def density(linear):
    return linear.weight.count_nonzero().item() / linear.weight.numel()


def way(linear, batch):
    """How the kernel stores a layer: its non-zeros, or every weight where it runs faster so (a
    contiguous dot product at batch 1, four rows at a time above): from ROWS_ABOVE non-zero."""
    return "rows" if density(linear) > ROWS_ABOVE[1 if batch == 1 else "more"] else "sparse"


def tune(prepared, x, batch, threads):
    """Set the tile size and thread count of every KernelLayers in prepared (a Prepared model or a
    KernelLayers) to the fastest measured on x."""
    packed = [s for s in getattr(prepared, "steps", [prepared]) if isinstance(s, KernelLayers)]
    options = tilings(batch, threads)
    if not packed or len(options) == 1:
        return
    times = []
    for tile, n in options:
        for k in packed:
            k.tile, k.threads = tile, n
        times.append(in_turn([prepared], x, rounds=3)[0])
    tile, n = options[min(range(len(options)), key=times.__getitem__)]
    for k in packed:
        k.tile, k.threads = tile, n
