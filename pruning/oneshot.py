"""Pruning without retraining: zero a trained network's weights to a sparsity from a few thousand
calibration images alone. Two choices are made apart: how much of each layer goes (the
allocation: here each layer keeps what global magnitude ranking leaves it, since the first layer
of an MLP holds most of the weights and can spare most), and which weights go and how the kept
ones make up for them (the method):

- 'magnitude': the smallest |w|;
- 'wanda': the smallest |w| times the norm of its input over the calibration images (Sun et al.
  2023), compared over the whole layer;
- 'reconstruct': optimal brain surgeon one column at a time, as SparseGPT does (Frantar and
  Alistarh 2023): each layer's weights are chosen and the kept ones corrected so that its outputs
  on its calibration inputs (the already pruned layers' outputs) come closest to what the dense
  network's layer gave on the dense network's: first the least-squares weights for that target,
  which undo the earlier layers' error, then the surgery from them, which chooses the weights to
  zero, then each row's kept weights refitted by least squares to the same target (the surgery
  is greedy); on validation images the target raised 95% zeros from 84 to 97% on the default
  MLP, and the refit 0.4 points at 90% (docs/one-shot.md); convolutions through their unfolded
  inputs.

pattern=(n, m) keeps n of every m consecutive weights along each row's inputs instead (2:4);
a CPU gains nothing from it without a kernel made for it."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning import criteria, surgery
from pruning.model import check_runs, evaluating, weighted
from pruning.units import LAYERS, Unit, attention_as_written, units_of

METHODS = ("magnitude", "wanda", "reconstruct")
BLOCK = 128  # columns chosen together in the reconstruction (SparseGPT's)
DAMPING = 0.01  # of the mean diagonal, added to each layer's input Gram matrix
CHUNK = 256  # calibration images a forward at a time
CALIBRATION = 2048  # training images to measure on: 1,024 to 4,096 tied on validation (docs/one-shot.md)


def check_pattern(pattern: tuple[int, int], sparsity: float | None) -> tuple[int, int]:
    """pattern as (n, m) with 0 < n < m, and sparsity its 1 - n/m (or None)."""
    if pattern is None:
        return None
    if not (isinstance(pattern, tuple) and len(pattern) == 2 and all(type(v) is int for v in pattern)
            and 0 < pattern[0] < pattern[1] <= 64):
        raise ValueError(f"pattern must be (n, m), whole numbers with 0 < n < m <= 64, not {pattern!r}")
    n, m = pattern
    if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
        raise ValueError(f"pattern {n}:{m} zeroes {1 - n / m:g} of the weights, not {sparsity:g}")
    return pattern


def keep_in_pattern(scores, pattern):
    """A mask keeping the n largest scores of every m consecutive ones along each row (of
    scores.flatten(1)); a last group of fewer than m keeps at most n."""
    n, m = pattern
    rows = scores.flatten(1)
    pad = -rows.shape[1] % m
    padded = F.pad(rows, (0, pad), value=-math.inf).view(rows.shape[0], -1, m)
    keep = torch.zeros_like(padded, dtype=torch.bool).scatter_(2, padded.topk(n, dim=2).indices, True)
    return keep.view(rows.shape[0], -1)[:, :rows.shape[1]].view_as(scores)


class Stop(Exception):
    """Raised in a hook once a forward has given what was recorded: the rest of it is not needed."""


def layer_sparsities(units, sparsity):
    """The fraction of each unit's weights that global magnitude ranking over `units` zeroes."""
    masks = criteria.keep_largest([unit.matrix().abs() for unit in units], sparsity)
    return [1 - mask.float().mean().item() for mask in masks]


def forward_order(model, example):
    """The units model's forward multiplies (units.py: each nn.Linear and nn.Conv2d, each
    nn.MultiheadAttention's four projections) in the order it first runs them, each with the rows
    of inputs it reads per input of the model and how often it is called, from one run on
    example's first input (check_runs: the model's own error as one line); and {module: name}.
    Refused: weighted layers other than these, and attention that carries pruning masks."""
    names = {m: name for name, m in model.named_modules()}
    seen = {}

    def record(module, args, kwargs):
        for unit in units_of(module) if isinstance(module, LAYERS + (nn.MultiheadAttention,)) else [None]:
            key = (module, None if unit is None else unit.part)
            rows = 0 if unit is None else unit.inputs(args, kwargs).shape[0]
            count, total, _ = seen.get(key, (0, 0, unit))
            seen[key] = (count + 1, total + rows, unit)

    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    for m in attention:
        if hasattr(m, "in_proj_weight_mask") or hasattr(m.out_proj, "weight_mask"):
            raise ValueError(f"layer {names[m]} (MultiheadAttention) carries pruning masks, which it does not "
                             "apply to its projections: make them permanent first (torch.nn.utils.prune.remove)")
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in weighted(model) + attention]
    try:
        check_runs(model, example, "the model cannot run on these calibration inputs")
    finally:
        for h in hooks:
            h.remove()
    for (module, _), (_, _, unit) in seen.items():
        if unit is None or getattr(module, "groups", 1) != 1:
            grouped = ", grouped" if isinstance(module, LAYERS) else ""
            raise ValueError(f"layer {names[module]} ({type(module).__name__}{grouped}) is not one one_shot "
                             "reconstructs (Linear, ungrouped Conv2d, MultiheadAttention): "
                             "use zero_prune, which takes every weighted layer")
    return [(unit, rows, count) for count, rows, unit in seen.values()], names  # check_runs ran one input


def recorded(model, dense, unit, twin, inputs, calls, dense_too):
    """(X^T X, X^T D) of unit's inputs over the calibration inputs, float64: X its inputs in model
    (pruned so far), D its twin's in dense (as it was); D is None unless dense_too. A forward stops
    at the unit where its module runs once."""
    gram = cross = 0
    for x in inputs.split(CHUNK):
        got = {}

        def keep(key, at):
            def hook(module, args, kwargs):
                got.setdefault(key, []).append(at.inputs(args, kwargs).double())
                if calls == 1:
                    raise Stop
            return hook

        pairs = [(model, unit, "x")] + ([(dense, twin, "d")] if dense_too else [])
        for net, at, key in pairs:
            handle = at.module.register_forward_pre_hook(keep(key, at), with_kwargs=True)
            try:
                net(x)
            except Stop:
                pass
            finally:
                handle.remove()
        rows = torch.cat(got["x"])
        gram = gram + rows.T @ rows
        if dense_too:
            cross = cross + rows.T @ torch.cat(got["d"])
    return gram, cross


def weakest(scores, sparsity):
    """A mask of the round(sparsity * n) smallest of scores (the ones to zero)."""
    k = round(sparsity * scores.numel())
    drop = torch.zeros(scores.numel(), dtype=torch.bool)
    drop[scores.flatten().topk(k, largest=False).indices] = True
    return drop.view_as(scores)


def scored(scores, forced):
    """scores with the weights forced to zero ranked below every other (scores are never negative)."""
    return scores if forced is None else scores.masked_fill(forced, -1.0)


def zeros_of(forced):
    return False if forced is None else forced


def reconstructed(weight, H, sparsity, pattern, forced=None):
    """weight (rows x columns, float64) pruned and its kept weights corrected column by column
    (SparseGPT): each zeroed weight's error spread over the columns not yet fixed, through the
    Cholesky factor of the inverse of H, the inputs' Gram matrix. forced: a mask of weights that
    must be zero (a pruning mask's), zeroed first."""
    W, H = weight.clone(), H.clone()
    dead = H.diagonal() == 0  # inputs that are always zero: their weights go, freely
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(DAMPING * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    columns = W.shape[1]
    for i1 in range(0, columns, BLOCK):
        i2 = min(i1 + BLOCK, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        d = Hinv1.diagonal()
        held = None if forced is None else forced[:, i1:i2]
        drop = None if pattern else weakest(scored(W1.square() / d.square(), held), sparsity) | zeros_of(held)
        for i in range(i2 - i1):
            if pattern and i % pattern[1] == 0:
                group = slice(i, min(i + pattern[1], i2 - i1))
                keep = keep_in_pattern(scored(W1[:, group].square() / d[group].square(),
                                              None if held is None else held[:, group]), pattern)
                drop = torch.zeros_like(W1, dtype=torch.bool) if drop is None else drop
                drop[:, group] = ~keep | zeros_of(None if held is None else held[:, group])
            w = W1[:, i]
            q = torch.where(drop[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:].sub_(err[:, None] * Hinv1[i, i:][None, :])
            W1[:, i] = q
            errors[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].sub_(errors @ Hinv[i1:i2, i2:])
    return W


def refitted(pruned, damped, targets):
    """Each row of pruned (its zeros kept) refitted by least squares: its kept weights w_K =
    damped_KK^-1 targets_K, where damped is the inputs' damped Gram matrix and targets' row is
    what the row's outputs should correlate with (cross @ dense row): the best weights the
    row's mask allows, where the column-by-column surgery is greedy. A row that keeps more weights
    than it zeroes is solved on its zeroed ones instead, through damped's inverse (w = H^-1 t - the
    part that the zeros' constraint removes): a system of the smaller size each row."""
    out = torch.zeros_like(pruned)
    inverse = solved = None
    for r in range(len(pruned)):
        keep = pruned[r].ne(0)
        kept, dropped = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
        if len(kept) == 0:
            continue
        if len(kept) <= len(dropped):
            out[r, kept] = torch.linalg.solve(damped[kept[:, None], kept], targets[r, kept])
            continue
        if inverse is None:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            solved = targets @ inverse  # each row's unconstrained least squares (inverse is symmetric)
        across = inverse[dropped]  # rows of H^-1 at the zeros
        held = torch.linalg.solve(across[:, dropped], solved[r, dropped])  # what holds them at zero
        out[r, kept] = (solved[r] - held @ across)[kept]
    return out


def check_arguments(sparsity, method, pattern):
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))):
        raise ValueError(f"sparsity must be a number from 0 to below 1, not {sparsity!r}")
    pattern = check_pattern(pattern, sparsity)
    if pattern is None and (sparsity is None or not 0 <= sparsity < 1):
        raise ValueError(f"sparsity must be from 0 to below 1, not {sparsity}")
    return pattern


def check_inputs(inputs):
    """The calibration inputs: a non-empty floating tensor of finite values (forward_order checks
    that the model runs on them)."""
    if not torch.is_tensor(inputs) or inputs.dim() < 1 or len(inputs) == 0:
        raise ValueError("inputs must be a tensor of at least one calibration input")
    if not inputs.is_floating_point() or not torch.isfinite(inputs).all():
        raise ValueError("the calibration inputs must be floating-point numbers, all of them finite")


ROWS_PER_COLUMN = 0.25  # the fewest rows of calibration inputs a reconstructed layer needs per column


def needed(unit, rows):
    """The calibration inputs a unit needs for its reconstruction, reading `rows` rows an input."""
    return math.ceil(ROWS_PER_COLUMN * unit.matrix().shape[1] / max(rows, 1))


@torch.no_grad()
def calibration_needed(model: nn.Module, example: torch.Tensor) -> int:
    """The fewest calibration inputs one_shot(method='reconstruct') takes for model, whose inputs
    are like example (a batch of one or more): ROWS_PER_COLUMN rows of inputs for every column of
    each layer it reconstructs.

    Example:
        >>> pruning.calibration_needed(pruning.mnist_mlp(), torch.zeros(1, 784))  # 196
    """
    with evaluating(model), attention_as_written():
        order, _ = forward_order(model, example[:1])
    return max((needed(unit, rows) for unit, rows, _ in order), default=1)


def check_enough(order, names, images):
    """For the reconstruction, at least ROWS_PER_COLUMN rows of inputs for each column of a layer:
    fewer fit the calibration images, not the data. At 90% zeros on the default MLP (validation
    images, 2 epochs of training): 16 images 44%, 64 88%, 128 94% (magnitude's 93%), 256 96%,
    784 97%, 2,048 97% (docs/one-shot.md)."""
    for unit, rows, _ in order:
        columns, need = unit.matrix().shape[1], needed(unit, rows)
        if images < need:
            raise ValueError(f"{unit.describe(names[unit.module])} reads {columns} inputs, and the "
                             f"reconstruction needs a row of calibration inputs for every {1 / ROWS_PER_COLUMN:g} of "
                             f"them: give at least {need} calibration inputs, not {images} (or method='wanda')")


def saved(units):
    """What Unit.write changes in each unit's module, to restore: the parameter it writes, and a
    pruning mask's unmasked weight and mask."""
    state = {}
    for unit in units:
        module, name, _ = unit.owner()
        names = [name] + (["weight_orig", "weight_mask"] if unit.part is None else [])
        tensors = state.setdefault(module, {})
        tensors.update({n: getattr(module, n).detach().clone() for n in names
                        if isinstance(getattr(module, n, None), torch.Tensor)})
    return list(state.items())


def restore(state):
    for module, tensors in state:
        for name, value in tensors.items():
            if name == "weight" and "weight_orig" in tensors:
                setattr(module, "weight", value)
            else:
                getattr(module, name).copy_(value)


@torch.no_grad()
def one_shot(model: nn.Module, inputs: torch.Tensor, sparsity: float | None = None, *, method: str = "reconstruct",
             pattern: tuple[int, int] | None = None) -> nn.Module:
    """Zero the weights of every nn.Linear, nn.Conv2d and nn.MultiheadAttention projection that
    model's forward runs to the fraction `sparsity` of them, with no training: each at the sparsity
    global magnitude ranking gives it, its weights chosen by `method` (METHODS) from the calibration
    tensor `inputs` (a few thousand training inputs), one after another in the order the forward
    runs them, on the inputs the already pruned network gives it (SparseGPT's sequential scheme:
    any graph, residual sums, concatenations and transformers included; an attention's query, key
    and value projections read its query, key and value, its output projection the heads'
    outputs). A layer that carries a pruning mask (torch.nn.utils.prune) keeps its masked weights
    at zero, and its mask holds the new zeros.

    Args:
        model: the trained network; changed in place (in eval mode while it measures, then in the
            mode it had), or left as it was on any error or interrupt.
        inputs: calibration inputs, a tensor the model runs on (2,048 training images: CALIBRATION);
            'reconstruct' needs a row of inputs for every 4 columns of a layer (calibration_needed).
        sparsity: the fraction of the weights to zero, from 0 to below 1.
        method: 'magnitude', 'wanda' or 'reconstruct'.
        pattern: (n, m) keeps n of every m consecutive weights of each row instead (sparsity 1 - n/m).

    Returns model.

    Example:
        >>> pruning.one_shot(model, x[:2048], 0.9)
        >>> pruning.one_shot(model, x[:2048], pattern=(2, 4), method="wanda")
    """
    pattern = check_arguments(sparsity, method, pattern)
    with evaluating(model), attention_as_written():
        check_inputs(inputs)
        order, names = forward_order(model, inputs[:1])
        if not order:
            raise ValueError(f"{type(model).__name__}'s forward runs no nn.Linear, nn.Conv2d or "
                             "nn.MultiheadAttention: nothing to prune")
        if pattern is None and sparsity == 0:
            return model
        if method == "reconstruct":
            check_enough(order, names, len(inputs))
        state = saved([unit for unit, _, _ in order])
        try:
            prune_in_order(model, inputs, order, names, sparsity, method, pattern)
        except BaseException:
            restore(state)
            raise
    return model


def prune_in_order(model, inputs, order, names, sparsity, method, pattern):
    """one_shot's work, in place, after its checks."""
    dense = surgery.copy_of(model) if method != "magnitude" else None  # as it was, masks and all
    twins = dict(dense.named_modules()) if dense is not None else {}
    units = [unit for unit, _, _ in order]
    targets = layer_sparsities(units, sparsity) if pattern is None else [None] * len(units)
    for (unit, _, calls), target in zip(order, targets):
        weight, forced = unit.matrix().double(), unit.forced()
        if method == "magnitude":
            scores = weight.abs()
        else:
            twin = Unit(twins[names[unit.module]], unit.part) if dense is not None else None
            H, cross = recorded(model, dense, unit, twin, inputs, calls, dense_too=method == "reconstruct")
            if method == "wanda":
                scores = weight.abs() * H.diagonal().sqrt()[None, :]
        if method == "reconstruct":
            damped = H + DAMPING * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype, device=H.device)
            aims = (cross @ weight.T).T  # each row's outputs' correlation with the dense network's
            target_weight = torch.linalg.solve(damped, aims.T).T  # W' X ~ W D: earlier layers' error undone
            new = refitted(reconstructed(target_weight, H, target, pattern, forced), damped, aims)
        else:
            scores = scored(scores, forced)
            drop = ~keep_in_pattern(scores, pattern) if pattern else weakest(scores, target)
            new = weight.masked_fill(drop | zeros_of(forced), 0)
        unit.write(new)
