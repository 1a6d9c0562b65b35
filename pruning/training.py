"""Training, distillation and evaluation, on tensors held in memory: a model and (x, y) are all they take."""

import math

import torch
import torch.nn.functional as F

from pruning import surgery

RECIPE = "fused adam, cosine learning rate, cross-entropy"


class Diverged(ArithmeticError):
    """Training left the weights non-finite."""


def distillation_loss(logits, labels, teacher_logits=None, temperature=4.0, weight=0.5):
    """Cross-entropy with the labels, mixed with weight of the KL divergence from the teacher's
    outputs softened by the temperature (Hinton et al. 2015); scaled by T^2 so that its gradients
    keep their size whatever the temperature. With no teacher or weight 0: plain cross-entropy."""
    hard = F.cross_entropy(logits, labels)
    if teacher_logits is None or weight == 0:
        return hard
    soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature ** 2 * soft


def train(model, data, epochs, lr=1e-3, batch_size=128, seed=0, teacher=None, temperature=4.0, weight=0.5,
          progress=None, penalty=None):
    """Adam (fused on CPU) with a cosine-decayed learning rate, reshuffling every epoch from a seeded
    generator; returns model, left in training mode. teacher: None, a model to distil from, or its
    logits for every example of data. progress: wraps the range of epochs (a progress bar).
    penalty: None, or a function of no arguments whose value is added to every batch's loss (a
    regulariser such as methods.group_lasso). The zeros of pruning masks (surgery.hold_below)
    stay zero, re-applied once a step."""
    x, y = data
    if isinstance(teacher, torch.nn.Module):
        teacher = logits(teacher, x)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    with surgery.masks_folded(model) as held:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr, fused=all(p.device.type in ("cpu", "cuda") for p in params))
        opt.register_step_post_hook(lambda *_: surgery.hold(held))  # the zeros are part of every step
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(x) / batch_size))
        for _ in (progress or iter)(range(epochs)):
            for idx in torch.randperm(len(x), generator=gen).to(x.device).split(batch_size):
                soft_targets = None if teacher is None else teacher[idx]
                loss = distillation_loss(model(x[idx]), y[idx], soft_targets, temperature, weight)
                if penalty is not None:
                    loss = loss + penalty()
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise Diverged("the weights are no longer finite numbers; lower the learning rate")
    return model


def finetuner(data, epochs, lr=1e-3, batch_size=128, seed=0, teacher=None, temperature=4.0, weight=0.5):
    """finetune(model) for the pruning functions: `epochs` of train() on data, distilling from
    teacher (a model, or its logits on data) when given."""
    if isinstance(teacher, torch.nn.Module):
        teacher = logits(teacher, data[0])

    def finetune(model):
        train(model, data, epochs, lr, batch_size, seed, teacher, temperature, weight)
    return finetune


@torch.no_grad()
def logits(model, x, batch_size=10_000):
    was_training = model.training
    model.eval()
    out = torch.cat([model(xb) for xb in x.split(batch_size)])
    model.train(was_training)
    return out


def predict(model, x):
    return logits(model, x).argmax(1)


def accuracy(model, data):
    """Percentage of correctly classified examples."""
    x, y = data
    return 100 * (predict(model, x) == y).double().mean().item()
