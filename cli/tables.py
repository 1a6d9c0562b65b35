"""The text of the scripts' tables: columns shared by both, the line under every table, and the
notes that say how the figures were taken."""

import statistics

import torch

from pruning import inference, measure
from pruning import model as models

PERCENT = "{:.2f}%".format


def name_of(model):
    """The network as figure titles name it: LeNet-5, or the MLP by its widths."""
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return "LeNet-5"
    return f"MLP {'-'.join(map(str, models.widths(model)))}"


def dense_line(summary, seeds_run):
    """The line under every table: what the rows are measured against."""
    def figure(key):
        std = summary.get(f"{key}_std")
        return f"{summary[key]:.2f}" + (f" ± {std:.2f}" if std is not None else "") + "%"
    line = f"Dense model: {figure('accuracy')} test accuracy"
    if "validation_accuracy" in summary:
        line += f", {figure('validation_accuracy')} on the held-out validation images"
    if "control_accuracy" in summary:
        line += (f"; trained {summary['control_epochs']:.0f} epochs in all, as long as a pruned model: "
                 f"{figure('control_accuracy')}")
    return line + (f" (mean ± sd over {seeds_run} seeds)." if seeds_run > 1 else ".")


def speed_columns(args):
    """The --speed columns: for_inference's speed-ups at each batch size, and the arithmetic's."""
    def speedups(by_batch):
        return " / ".join(f"{by_batch[str(b)]:.1f}" for b in inference.BATCHES) + "x"
    return [("Speed-up (batch 1 / 32 / 10,000)", "speedup", speedups),
            ("Fewer Multiply-adds", "flops_ratio", "{:.1f}x".format)] if args.speed else []


def speed_note(args, run, rows):
    """The lines under a table that say how its times were taken."""
    dense = statistics.mean(r["dense_inference_time_s"] for r in rows)
    line = (f"Times: the 10,000 test images in one batch, each row the median of {measure.ROUNDS} rounds taken in "
            f"turn with the dense model ({dense:.4f} s), {args.threads} threads, {run.machine['cpu']}.")
    if args.speed:
        line += ("\nSpeed-up: pruning.for_inference(model, batch) against the dense model in PyTorch, timed in turn at "
                 "each batch size; Fewer Multiply-adds: the dense model's over the pruned one's.")
    if run.busy:
        line += "\nWarning: other processes used the CPU while these times were taken; rerun on an idle machine."
    return line


def baseline_columns(rows):
    return [("Random", "random_accuracy", PERCENT), ("Layer-wise", "layerwise_accuracy", PERCENT)] \
        if "random_accuracy" in rows[0] else []


def compressed_columns(finetuned):
    return [("Quantized", "quantized_accuracy", PERCENT),
            *([("Q. Fine-tuned", "quantized_finetuned_accuracy", PERCENT)] if finetuned else []),
            ("Compressed File (B)", "compressed_bytes", "{:,.0f}".format),
            ("x Smaller", "times_smaller", "{:.1f}".format)]


def compressed_note(bits):
    return (f"Compressed: {bits}-bit shared weight values per layer, positions and codes LZMA-coded "
            "(pruning/formats/compressed.py); the file holds the model of the last accuracy column before it; "
            "x Smaller is the dense file's size over it.")
