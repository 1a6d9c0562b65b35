"""Benchmarks that print their figures: the zero-pruning job's wall time from scratch and from the
cached model, and the inference latency of pruned models against the dense one. Activation
pruning is timed with plain widths and with widths rounded up to a multiple of 8 (--multiple-of).

    python bench.py
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import activation_pruning
import common
import zero_pruning

BATCHES = [1, 32, 10000]
SPARSITIES = [0.5, 0.8, 0.9, 0.95, 0.98]
ACTIVATION_THRESHOLDS = [0.6, 0.8, 0.9, 1.0]
ROUNDS = 5


def time_job(args, checkpoint, retrain):
    """Wall time of `python zero_pruning.py` as a user runs it, start-up and data loading included."""
    command = [sys.executable, "zero_pruning.py", "--quiet", "--checkpoint", checkpoint, "--threads", str(args.threads)]
    command += ["--data-dir", str(mnist.data_root(args.data_dir))] + (["--retrain"] if retrain else [])
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).parent)
    return time.perf_counter() - start


def latency_rows(name, dense, pruned, x, threads):
    """Per batch size: dense and pruned latency, and the speed-up. The two are timed in turn, ROUNDS
    times each, and each keeps the median of its rounds: a passing load on the machine slows both alike."""
    rows = []
    for batch in BATCHES:
        xb = x[:batch].contiguous()
        times = [[common.inference_time(fn, xb, threads, min_run_time=0.2) for fn in (dense, pruned)]
                 for _ in range(ROUNDS)]
        t_dense, t_pruned = (statistics.median(column) for column in zip(*times))
        rows.append({"model": name, "batch": batch, "dense_ms": 1e3 * t_dense, "pruned_ms": 1e3 * t_pruned,
                     "speedup": t_dense / t_pruned})
    return rows


COLUMNS = [("Model", "model", str), ("Batch", "batch", "{:,}".format), ("Dense (ms)", "dense_ms", "{:.3f}".format),
           ("Pruned (ms)", "pruned_ms", "{:.3f}".format), ("Speed-up", "speedup", "{:.2f}x".format)]


def main():
    p = common.parser(__doc__.split("\n\n")[0], [])
    p.add_argument("--skip-job", action="store_true", help="skip timing the whole zero-pruning job")
    args = p.parse_args()
    args.device = "cpu"
    if not args.skip_job:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = os.path.join(tmp, "mlp.pt")
            scratch, cached = time_job(args, checkpoint, True), time_job(args, checkpoint, False)
        print(f"zero_pruning.py from scratch (training + sweep): {scratch:.1f} s (bar: 45 s)")
        print(f"zero_pruning.py with the cached model:           {cached:.1f} s (bar: 10 s)\n")

    model, train_data, test_data = common.setup(args)
    x = test_data[0]
    print(f"Inference latency: median of {ROUNDS} rounds, each the median of repeats after warm-up; "
          f"{args.threads} threads, CPU.\n")
    rows = []
    for s in SPARSITIES:
        pruned = zero_pruning.make_permanent(zero_pruning.prune_below(
            model, zero_pruning.threshold_for_sparsity(model, s)))
        name = f"zero pruning, {100 * zero_pruning.count_zeros(pruned) / common.count_weights(model):.1f}% zeros, CSR"
        rows += latency_rows(name, model, zero_pruning.sparse_forward(pruned), x, args.threads)
    print(common.markdown_table(rows, COLUMNS) + "\n")

    rows = []
    means = activation_pruning.mean_activations(model, train_data[0])
    for t in ACTIVATION_THRESHOLDS:
        for multiple in (1, 8):
            keep, _ = activation_pruning.neurons_to_keep(means, t, multiple)
            pruned = activation_pruning.remove_neurons(model, keep)
            reduction = 100 * (1 - common.count_params(pruned) / common.count_params(model))
            widths = "-".join(map(str, common.widths(pruned)[1:-1]))
            name = f"activation pruning at {t:g}, widths {widths}, {reduction:.1f}% fewer params"
            rows += latency_rows(name, model, pruned, x, args.threads)
    print(common.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    common.run(main)
