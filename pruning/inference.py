"""A model made ready to predict fast on a CPU. for_inference(model, batch_size) takes the model's
last run of fully connected layers and runs each either as PyTorch runs it (dense) or through the
kernel of kernels.py, stored as its non-zeros (sparse) or whole (rows, by its density: the
kernel's measured crossovers), consecutive kernel layers as one compiled call. Plans (all in the
kernel, the densest layers in PyTorch, all in PyTorch) are timed on this machine at that batch
size beside the model as given, and the fastest is kept, so what it returns is never slower than
what it was given. Where a chain's convolutions and max-poolings can all be lowered to the
kernel's rows (lowering.py: LeNet-5's), a plan running everything from its first convolution in
the kernel is timed against the best of those too; otherwise they stay PyTorch's. A graph
(residual sums, concatenations) goes to graphplan.py.
"""

import copy

import torch
import torch.nn as nn

from pruning import chain, graph, graphplan, kernels, surgery
from pruning.measure import in_turn
from pruning.model import KeepInputs, Normalize, check_runs
from pruning.plans import (
    CALIBRATION,
    DENSE_ABOVE,
    MAX_BATCH,
    Prepared,
    as_given,
    calibration,
    chosen,
    density,
    fastest,
    gather,
    hooked,
    input_shape,
    lowered,
    plan,
    split,
    tune,
    way,
    ways_of,
)

BATCHES = (1, 32, 10000)  # the batch sizes every speed-up is measured at


@torch.no_grad()
def for_inference(model: nn.Module, batch_size: int = 32, *, example: torch.Tensor | None = None) -> nn.Module:
    """A copy of model for predicting on the CPU, about batch_size inputs a call: in eval mode,
    without gradients, its last run of fully connected layers (a chain's convolutions too; a graph's
    runs of layers, or the whole graph in one call) computed on their non-zeros where that is
    faster here, and the model as given kept where that is faster still. It predicts as model
    does: its logits differ only by float rounding (the sums run in another order). What it
    returns says what it did in its `summary`; where it cannot run any layer faster (no layer the
    kernel runs, not fp32, hooks, no llvmlite) it returns the model as given with a warning.
    example: a batch of the model's inputs, needed only for a model that does not start with
    nn.Linear or this project's Normalize or KeepInputs.

    Example:
        >>> fast = pruning.for_inference(pruning.load("net.pt"), batch_size=32)
        >>> print(fast.summary)
    """
    if type(batch_size) is not int or not 0 < batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be a whole number from 1 to {MAX_BATCH:,}, not {batch_size!r}")
    given = surgery.copy_of(model).eval().requires_grad_(False)
    if example is not None:  # else the kernel would read inputs of a size the model does not take
        check_runs(given, example, "example is not an input the model takes")
    try:
        layers = chain.layers(given)
    except chain.NotAChain:  # residual sums, concatenations: each run of kernel layers timed on its own
        return graph_prepared(given, batch_size, example)
    shape = input_shape(layers, example)
    loose = bool(layers) and isinstance(layers[0], (Normalize, KeepInputs, nn.Flatten))  # reshape their input
    parts = split(layers)
    if parts is None:
        return as_given(given, "it does not end in nn.Linear layers with ReLU or no activation between them "
                                 "(as PyTorch writes them, with no hooks)")
    why = unrunnable(given)
    if why:
        return as_given(given, why)
    before, run = parts
    folded = gather(before, run[0][0])
    kernel = [way(linear, batch_size) for linear, _ in run]
    mixed = [w if density(linear) <= DENSE_ABOVE else "dense" for w, (linear, _) in zip(kernel, run)]
    dense = ["dense"] * len(run)
    ways = [w for i, w in enumerate([dense, kernel, mixed]) if w not in [dense, kernel, mixed][:i]]
    x = calibration(min(batch_size, CALIBRATION), shape)
    threads, packed = torch.get_num_threads(), {}
    if folded is None:  # what comes before the run is PyTorch's in every plan: time the run alone, on its inputs
        h = nn.Sequential(*before)(x).flatten(1).contiguous()
        tails = [plan([], run, w, None, h.shape[1:], False, given, packed) for w in ways]
        for tail in tails[1:]:
            tune(tail, h, batch_size, threads)
        best = fastest(tails, h)
        best = given if best is tails[0] else Prepared(nn.Sequential(*before), best.steps, shape, loose, given,
                                                       best.ways).eval()
    else:
        candidates = [given] + [plan(before, run, w, folded, shape, loose, given, packed) for w in ways[1:]]
        for candidate in candidates[1:]:
            tune(candidate, x, batch_size, threads)
        best = fastest(candidates, x)
    convolutions = convolution_plan(layers, shape, loose, given, batch_size, packed)
    if convolutions is not None:  # everything from the first convolution in the kernel, against the best so far
        tune(convolutions, x, batch_size, threads)
        best = fastest([best, convolutions], x)
    return chosen(given) if best is given else best


def unrunnable(given):
    """Why the kernel cannot run any of the model's layers, or None: not fp32 on the CPU, hooks (which
    the kernel would not run), no llvmlite."""
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in given.parameters()):
        return "the kernel runs fp32 models on the CPU"
    if any(hooked(m) for m in given.modules()):
        return "it has hooks, which the kernel would not run"
    if not kernels.available():
        return "llvmlite, which compiles the kernel, is not installed (pip install llvmlite)"
    return None


def graph_prepared(given, batch_size, example):
    """for_inference of a model that is no chain: its graph (graph.py) through graphplan.py."""
    try:
        joined = graph.of(given)
    except chain.NotAChain as e:
        return as_given(given, f"it is neither a chain nor a graph of layers this library reads ({e})")
    why = unrunnable(given)
    if why:
        return as_given(given, why)
    shape = input_shape(list(joined.layers), example)
    x = calibration(min(batch_size, graphplan.CALIBRATION), shape)
    fast = graphplan.prepared(given, joined, shape, batch_size, x, torch.get_num_threads())
    return chosen(given) if fast is None else fast


def convolution_plan(layers, shape, loose, given, batch, packed):
    """A Prepared model running every layer from the chain's first convolution in the kernel (the
    convolutions and poolings as rows, lowering.py), or None where the kernel cannot run them all."""
    parts = lowered(layers, shape)
    if parts is None:
        return None
    before, run = parts
    return plan(before, run, ways_of(run, batch), gather(before, run[0][0]), shape, loose, given, packed,
                what="layers from the first convolution")


def speedups(dense, model, x, batches=BATCHES):
    """{str(batch): how many times faster for_inference(model, batch) runs `batch` images of x than
    dense runs them in PyTorch}, the two timed in turn at each batch size; the keys are strings, as
    the scripts' JSON holds them."""
    dense = torch.no_grad()(copy.deepcopy(dense).eval())
    out = {}
    for batch in batches:
        xb = x[torch.arange(batch) % len(x)]  # x over again where it holds fewer
        t_dense, t_fast = in_turn([dense, for_inference(model, batch)], xb)
        out[str(batch)] = t_dense / t_fast
    return out
