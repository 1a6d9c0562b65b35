"""Measuring a model: how fast it runs, on dense or sparse weights, how much arithmetic it does,
and on what machine."""

import logging
import os
import platform
from pathlib import Path

import torch
import torch.nn as nn

from pruning import chain
from pruning.storage import to_csr


@torch.no_grad()
def inference_time(fn, x, threads, min_run_time=0.5):
    """Median seconds of fn(x), after warm-up, with a fixed thread count (torch.utils.benchmark)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # a CUDA notice on import
    from torch.utils.benchmark import Timer
    timer = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


@torch.no_grad()
def flops(model, example):
    """Multiply-adds per image of model on one input like example, counting only non-zero weights:
    a linear layer's non-zero weights, a convolution's times the positions of its output."""
    total = 0

    def count(layer, _, output):
        nonlocal total
        nonzero = layer.weight.count_nonzero().item()
        total += nonzero * (output[0].shape[-2:].numel() if isinstance(layer, nn.Conv2d) else 1)

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, chain.WEIGHTED)]
    try:
        was_training = model.training
        model.eval()
        model(example[:1])
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total


def sparse_forward(model):
    """The forward pass of a zero-pruned MLP on CSR weights (CPU). Activations stay feature-major,
    so every layer is one CSR @ dense product, the fast direction for torch.sparse. Turning the
    batch feature-major is a copy anyway, and it keeps only the inputs that some weight reads.
    Layers before the first nn.Linear (the input normalisation, the pixels kept) run as they are."""
    layers = chain.layers(model)
    first = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    if any(isinstance(m, nn.Conv2d) for m in layers):
        raise ValueError("sparse inference covers networks of nn.Linear layers")
    before = nn.Sequential(*layers[:first])
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    head = linears[0].weight.detach().cpu()
    used = head.ne(0).any(0).nonzero().squeeze(1)
    weights = [to_csr(head[:, used])] + [to_csr(layer.weight) for layer in linears[1:]]
    biases = [layer.bias.detach().cpu()[:, None] for layer in linears]

    def forward(x):
        h = before(x).T[used]
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            h = torch.addmm(bias, weight, h)
            if i < len(weights) - 1:
                h.relu_()
        return h.T
    return forward


def cpu_info(key):
    """The value of the first line of /proc/cpuinfo that starts with key; None where there is none (not Linux)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(key))
    except (OSError, StopIteration, IndexError):
        return None


def machine():
    """What the figures were measured on: another CPU rounds differently, and prints slightly different ones."""
    cpu = cpu_info("model name") or platform.processor() or platform.machine()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "pytorch": torch.__version__}


def native_bf16():
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo; None where unknown."""
    flags = cpu_info("flags")
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
