"""Training, distillation and evaluation, on tensors held in memory: a model and (x, y) are all they take."""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.adam import adam as functional_adam

from pruning import chain, surgery
from pruning.data import dropped, shifted

Data = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels)
Teacher = torch.Tensor | nn.Module | None  # what distillation learns from: logits, or a model
Finetune = Callable[[nn.Module], object]  # trains a model in place

RECIPE = "fused adam, cosine learning rate, cross-entropy"
EVAL_BATCH = 500  # images a forward pass when nothing is learned: each layer's activations stay in the CPU's caches


class Diverged(ArithmeticError):
    """Training left the weights non-finite."""


@dataclass(frozen=True)
class Recipe:
    """How a network is trained: fused Adam with a cosine-decayed learning rate on cross-entropy,
    mixed with distillation where a teacher is given. train, finetuner and
    sparse_variational_dropout take one, and any of its fields as keywords beside it.

    Example:
        >>> recipe = pruning.Recipe(epochs=2, batch_size=64)
        >>> pruning.train(model, (x, y), recipe)
        >>> finetune = pruning.finetuner((x, y), recipe, epochs=1, teacher=model)
    """
    epochs: int = 1
    lr: float = 1e-3  # Adam's, decayed to 0 along a cosine over all the steps
    batch_size: int = 128
    seed: int = 0  # of the shuffling, the shifts and the dropped pixels
    temperature: float = 4.0  # softens both networks' logits in the distillation
    distill_weight: float = 0.5  # the distillation's share of the loss, where a teacher is given
    bf16: bool = False  # every product but the logits' in bf16 (bf16_forward)
    shift: int = 0  # every batch's images moved at random by up to this many pixels (data.shifted)
    input_dropout: float = 0.0  # every batch's pixels dropped with this probability (data.dropped)


def recipe_of(recipe, options, call):
    """recipe (a Recipe, or None for the defaults) with `options` (keywords naming its fields) in
    place of its own values."""
    if recipe is None:
        recipe = Recipe()
    if not isinstance(recipe, Recipe):
        raise ValueError(f"{call}: recipe must be a pruning.Recipe, not {recipe!r} (give epochs=... by name)")
    unknown = sorted(options.keys() - {f.name for f in fields(Recipe)})
    if unknown:
        raise TypeError(f"{call}() got unexpected keyword arguments {', '.join(unknown)}; a Recipe's fields are "
                        f"{', '.join(f.name for f in fields(Recipe))}")
    return replace(recipe, **options)


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None, *,
                      temperature: float = 4.0, weight: float = 0.5) -> torch.Tensor:
    """Cross-entropy with the labels, mixed with weight of the KL divergence from the teacher's
    outputs softened by the temperature (Hinton et al. 2015); scaled by T^2 so that its gradients
    keep their size whatever the temperature. With no teacher or weight 0: plain cross-entropy."""
    hard = F.cross_entropy(logits, labels)
    if teacher_logits is None or weight == 0:
        return hard
    soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature ** 2 * soft


def cosine_rates(lr, steps):
    """The learning rate of each of `steps` steps, decayed to 0 along a cosine, each computed from
    the one before as torch.optim.lr_scheduler.CosineAnnealingLR does: the same numbers to the bit."""
    for step in range(steps):
        yield lr
        lr = (1 + math.cos(math.pi * (step + 1) / steps)) / (1 + math.cos(math.pi * step / steps)) * lr


def adam(params):
    """update(lr): one step of torch.optim.Adam's arithmetic (its defaults, fused on CPU and CUDA)
    on the parameters that have gradients, through PyTorch's functional Adam: the same numbers as
    the optimiser object, without its Python bookkeeping each step, and without the second that
    importing torch._dynamo takes when a process makes its first torch.optim optimiser."""
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    state = [(p, torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), device=p.device if fused else "cpu"))
             for p in params]

    @torch.no_grad()
    def update(lr):
        live = [(p, p.grad, m, v, t) for p, m, v, t in state if p.grad is not None]
        if live:
            weights, grads, means, squares, counts = map(list, zip(*live))
            functional_adam(weights, grads, means, squares, [], counts, fused=fused, amsgrad=False, beta1=0.9,
                            beta2=0.999, lr=lr, weight_decay=0.0, eps=1e-8, maximize=False)
    return update


def bf16_forward(model):
    """model's forward with the products of every layer before its last weighted one in bf16
    (torch.autocast) and that last layer, the logits, in fp32: the weights stay fp32. On the default
    MLP its accuracy is fp32's within the spread over seeds, where bf16 logits lose about 0.07
    points (README, Speed). model: a chain of layers (see chain.layers)."""
    layers = chain.layers(model)
    weighted = [i for i, layer in enumerate(layers) if isinstance(layer, chain.WEIGHTED)]
    if not weighted:
        raise chain.NotAChain("bf16 training needs a network with an nn.Linear or nn.Conv2d layer")
    last = weighted[-1]
    head, tail = nn.Sequential(*layers[:last]), nn.Sequential(*layers[last:])

    def forward(x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            h = head(x)
        return tail(h.float())
    return forward


def teacher_targets(teacher, x, shift):
    """What train() distils from: a teacher model's logits on x, computed once, or with shift the
    model itself, to judge each batch's moved images; logits given already are for x as it is."""
    if shift and teacher is not None and not isinstance(teacher, nn.Module):
        raise ValueError("a teacher's logits are for the images as they are: with shift, give the teacher model")
    return logits(teacher, x) if isinstance(teacher, nn.Module) and not shift else teacher


def train(model: nn.Module, data: Data, recipe: Recipe | None = None, *, teacher: Teacher = None,
          penalty: Callable[[], torch.Tensor] | None = None, progress: Callable | None = None,
          **options: Any) -> nn.Module:
    """Train model on data as the recipe says: Adam (fused on CPU) with a cosine-decayed learning
    rate, reshuffling every epoch from a seeded generator; returns model, left in training mode.
    The zeros of pruning masks (surgery.hold_below) stay zero, re-applied once a step. Training
    that diverges gives the model back as it was (Diverged).

    Args:
        model: the network, trained in place.
        data: (x, y), the images and their labels.
        recipe: a Recipe (the defaults where None); options: any of its fields by name, in its place.
        teacher: None, a model to distil from, or its logits for every example of data. With the
            recipe's shift, the teacher (then a model) judges the same moved images; with its
            input_dropout, the whole images.
        penalty: None, or a function of no arguments whose value is added to every batch's loss
            (a regulariser such as methods.group_lasso).
        progress: wraps the range of epochs (a progress bar).

    Example:
        >>> pruning.train(model, (x, y), epochs=2)
    """
    recipe = recipe_of(recipe, options, "train")
    epochs, lr, batch_size, seed = recipe.epochs, recipe.lr, recipe.batch_size, recipe.seed
    shift, input_dropout, bf16 = recipe.shift, recipe.input_dropout, recipe.bf16
    x, y = data
    if len(x) != len(y):
        raise ValueError(f"{len(x):,} images and {len(y):,} labels: give one label an image")
    if not 0 <= input_dropout < 1:
        raise ValueError(f"input_dropout must be from 0 to below 1, not {input_dropout}")
    teacher = teacher_targets(teacher, x, shift)
    forward = bf16_forward(model) if bf16 else model
    model.train()
    gen = torch.Generator().manual_seed(seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # given back if training diverges
    with surgery.masks_folded(model) as held:
        params = [p for p in model.parameters() if p.requires_grad]
        update = adam(params)
        rates = cosine_rates(lr, epochs * math.ceil(len(x) / batch_size))
        for _ in (progress or iter)(range(epochs)):
            for idx in torch.randperm(len(x), generator=gen).to(x.device).split(batch_size):
                images = x.index_select(0, idx)  # index_select: a third of x[idx]'s time
                if shift:
                    images = shifted(images, shift, gen)
                soft_targets = None if teacher is None else \
                    logits(teacher, images) if shift else teacher.index_select(0, idx)
                if input_dropout:
                    images = dropped(images, input_dropout, gen)
                loss = distillation_loss(forward(images), y.index_select(0, idx), soft_targets,
                                         temperature=recipe.temperature, weight=recipe.distill_weight)
                if penalty is not None:
                    loss = loss + penalty()
                for p in params:
                    p.grad = None
                loss.backward()
                update(next(rates))
                surgery.hold(held)
                torch.clear_autocast_cache()  # under a caller's autocast, the next forward casts the new weights
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                break
        else:
            return model
    with torch.no_grad():
        model.load_state_dict(before)
    raise Diverged("the weights are no longer finite numbers; lower the learning rate (the model is as it was)")


def finetuner(data: Data, recipe: Recipe | None = None, *, teacher: Teacher = None,
              **options: Any) -> Callable[[nn.Module], None]:
    """finetune(model) for the pruning functions: train() on data as the recipe (and options, any of
    its fields by name) says, distilling from teacher (a model, or its logits on data) when given.

    Example:
        >>> finetune = pruning.finetuner((x, y), epochs=1, teacher=dense)
        >>> pruning.zero_prune(model, 0.9, steps=3, finetune=finetune)
    """
    recipe = recipe_of(recipe, options, "finetuner")
    teacher = teacher_targets(teacher, data[0], recipe.shift)

    def finetune(model):
        train(model, data, recipe, teacher=teacher)
    return finetune


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """model's outputs on x, in eval mode, batch_size images at a time."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(xb) for xb in x.split(batch_size)])
    model.train(was_training)
    return out


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return logits(model, x).argmax(1)


def accuracy(model: nn.Module, data: Data) -> float:
    """Percentage of correctly classified examples."""
    x, y = data
    return 100 * (predict(model, x) == y).double().mean().item()
