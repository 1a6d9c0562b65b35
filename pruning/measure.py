"""Measuring a model: how fast it runs (timed in turn with others), how much arithmetic it does,
and on what machine."""

import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from pruning import chain

ROUNDS = 5  # timings taken in turn; each keeps the median of its rounds


@torch.no_grad()
def inference_time(fn, x, threads, min_run_time=0.5):
    """Median seconds of fn(x), after warm-up, with a fixed thread count (torch.utils.benchmark)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # a CUDA notice on import
    from torch.utils.benchmark import Timer
    timer = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def in_turn(fns, x, rounds=ROUNDS, least=0.01):
    """Median seconds of each fn(x), the fns timed in turn, `rounds` times, each round repeating a
    fn until `least` seconds have passed (after one call of each to warm up): a load that comes
    and goes slows them all alike, so their ratios hold where their times do not."""
    for fn in fns:
        fn(x)
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, column in zip(fns, times):
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < least or n == 0:
                fn(x)
                n += 1
            column.append(elapsed / n)
    return [statistics.median(column) for column in times]


def cpu_used_by_others(seconds=0.5):
    """The share of this machine's CPU time that other processes used over `seconds`, while this
    one sleeps (from /proc/stat: Linux), or None where that cannot be read."""
    def busy_and_total():
        ticks = [int(n) for n in Path("/proc/stat").read_text().split()[1:9]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # all but idle and iowait
    try:
        busy, total = busy_and_total()
        time.sleep(seconds)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError):
        return None
    return (busy_after - busy) / max(1, total_after - total)


@torch.no_grad()
def flops(model: nn.Module, example: torch.Tensor) -> int:
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
