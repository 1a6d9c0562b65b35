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

from pruning import chain, criteria, surgery
from pruning.model import evaluating, weighted

METHODS = ("magnitude", "wanda", "reconstruct")
BLOCK = 128  # columns chosen together in the reconstruction (SparseGPT's)
DAMPING = 0.01  # of the mean diagonal, added to each layer's input Gram matrix
CHUNK = 256  # calibration images a forward at a time
CALIBRATION = 2048  # training images to measure on: 1,024 to 4,096 tied on validation (docs/one-shot.md)


def check_pattern(pattern, sparsity):
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


def layer_sparsities(model, sparsity):
    """The fraction of each weighted layer's weights that global magnitude ranking zeroes."""
    masks = criteria.keep_largest([layer.weight.detach().abs() for layer in weighted(model)], sparsity)
    return [1 - mask.float().mean().item() for mask in masks]


def inputs_of(layer, h):
    """A weighted layer's input h as rows its weight (flattened to 2-d) multiplies: a Linear's as
    it is, a convolution's unfolded into one row per output position."""
    if isinstance(layer, nn.Linear):
        return h.flatten(0, -2)
    cols = F.unfold(h, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, C*k*k, L)
    return cols.transpose(1, 2).flatten(0, 1)


def grams(layer, pruned_before, dense_before, inputs):
    """(X^T X, X^T D) of the layer's inputs, float64: X from running inputs through the pruned
    layers before it, D through the same layers as they were before pruning."""
    gram = cross = 0
    for x in inputs.split(CHUNK):
        d = x
        for p, q in zip(pruned_before, dense_before):
            x, d = p(x), q(d)
        rows, dense_rows = inputs_of(layer, x).double(), inputs_of(layer, d).double()
        gram, cross = gram + rows.T @ rows, cross + rows.T @ dense_rows
    return gram, cross


def weakest(scores, sparsity):
    """A mask of the round(sparsity * n) smallest of scores (the ones to zero)."""
    k = round(sparsity * scores.numel())
    drop = torch.zeros(scores.numel(), dtype=torch.bool)
    drop[scores.flatten().topk(k, largest=False).indices] = True
    return drop.view_as(scores)


def reconstructed(weight, H, sparsity, pattern):
    """weight (rows x columns, float64) pruned and its kept weights corrected column by column
    (SparseGPT): each zeroed weight's error spread over the columns not yet fixed, through the
    Cholesky factor of the inverse of H, the inputs' Gram matrix."""
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
        drop = None if pattern else weakest(W1.square() / d.square(), sparsity)
        for i in range(i2 - i1):
            if pattern and i % pattern[1] == 0:
                group = slice(i, min(i + pattern[1], i2 - i1))
                keep = keep_in_pattern(W1[:, group].square() / d[group].square(), pattern)
                drop = torch.zeros_like(W1, dtype=torch.bool) if drop is None else drop
                drop[:, group] = ~keep
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
    row's mask allows, where the column-by-column surgery is greedy."""
    out = torch.zeros_like(pruned)
    for r in range(len(pruned)):
        kept = pruned[r].ne(0).nonzero().squeeze(1)
        if len(kept):
            out[r, kept] = torch.linalg.solve(damped[kept][:, kept], targets[r, kept])
    return out


@torch.no_grad()
def one_shot(model, inputs, sparsity=None, method="reconstruct", pattern=None):
    """Zero the weights of every nn.Linear and nn.Conv2d of model (a chain) to the fraction
    `sparsity` of them, with no training: each layer at the sparsity global magnitude ranking
    gives it, its weights chosen by `method` (METHODS) from the calibration tensor `inputs` (a
    few thousand training images), layer after layer on the already pruned network's outputs.
    pattern=(n, m): n of every m consecutive weights of each row kept instead (sparsity 1 - n/m).
    Changes model in place (in eval mode while it measures, then in the mode it had) and returns it."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    pattern = check_pattern(pattern, sparsity)
    if pattern is None and (sparsity is None or not 0 <= sparsity < 1):
        raise ValueError(f"sparsity must be from 0 to below 1, not {sparsity}")
    layers = chain.layers(model)
    dense = list(surgery.copy_of(nn.Sequential(*layers)))  # the layers as they were, masks and all
    if not torch.is_tensor(inputs) or len(inputs) == 0:
        raise ValueError("inputs must be a tensor of at least one calibration input")
    with evaluating(model):
        targets = layer_sparsities(model, sparsity) if pattern is None else [None] * len(weighted(model))
        done = 0
        for k, layer in enumerate(layers):
            if not isinstance(layer, chain.WEIGHTED):
                continue
            target = targets[done]
            done += 1
            weight = layer.weight.flatten(1).double()
            if method == "reconstruct":
                H, cross = grams(layer, layers[:k], dense[:k], inputs)
                damped = H + DAMPING * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
                aims = (cross @ weight.T).T  # each row's outputs' correlation with the dense network's
                target_weight = torch.linalg.solve(damped, aims.T).T  # W' X ~ W D: earlier layers' error undone
                new = refitted(reconstructed(target_weight, H, target, pattern), damped, aims)
            else:
                scores = weight.abs()
                if method == "wanda":
                    scores = scores * grams(layer, layers[:k], dense[:k], inputs)[0].diagonal().sqrt()[None, :]
                drop = ~keep_in_pattern(scores, pattern) if pattern else weakest(scores, target)
                new = weight.masked_fill(drop, 0)
            layer.weight.copy_(new.view_as(layer.weight).to(layer.weight.dtype))
    return model
