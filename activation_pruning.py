"""Activation pruning: measure each hidden neuron's mean ReLU activation over the training set,
remove the neurons below a threshold and rebuild genuinely smaller nn.Linear layers.

    python activation_pruning.py                                           # the default threshold sweep
    python activation_pruning.py --finetune-epochs 10 --bias-compensation  # and recover accuracy
"""

import math
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

import common
import compressed

THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]


@torch.no_grad()
def mean_activations(model, x):
    """Per hidden layer, each neuron's mean post-ReLU activation over x."""
    means = []
    for module in model:
        x = module(x)
        if isinstance(module, nn.ReLU):
            means.append(x.mean(0))
    return means


def neurons_to_keep(means, threshold, multiple=1):
    """Per hidden layer, a mask of the neurons with mean activation >= threshold. A layer is never
    emptied: where no neuron reaches the threshold the strongest one stays (its index is in `rescued`).
    With multiple > 1 each width is rounded up to a multiple of it by also keeping the strongest
    neurons below the threshold, since matrix kernels run faster on such widths."""
    keep, rescued = [], []
    for i, m in enumerate(means):
        above = (m >= threshold).sum().item()
        if above == 0:
            rescued.append(i)
        width = min(len(m), multiple * math.ceil(max(above, 1) / multiple))
        k = torch.zeros_like(m, dtype=torch.bool)
        k[m.argsort(descending=True, stable=True)[:width]] = True
        keep.append(k)
    return keep, rescued


@torch.no_grad()
def remove_neurons(model, keep, means=None):
    """A smaller model without the hidden neurons whose keep entry is False: their rows go from
    one layer, their columns from the next. With means (bias compensation), every removed neuron's
    mean activation times its outgoing weights is folded into the next layer's bias."""
    layers = common.linears(model)
    rows = [torch.arange(layers[0].in_features, device=keep[0].device)]
    rows += [k.nonzero().squeeze(1) for k in keep]
    rows += [torch.arange(layers[-1].out_features, device=keep[0].device)]
    smaller = common.mlp([len(r) for r in rows]).to(keep[0].device)
    for i, (old, new) in enumerate(zip(layers, common.linears(smaller))):
        bias = old.bias.clone()
        if means is not None and i > 0:
            gone = ~keep[i - 1]
            bias += old.weight[:, gone] @ means[i - 1][gone]
        new.weight.copy_(old.weight[rows[i + 1]][:, rows[i]])
        new.bias.copy_(bias[rows[i + 1]])
    return smaller


def sweep(model, train_data, test_data, args, save_dir):
    means = mean_activations(model, train_data[0])
    teacher = common.logits(model, train_data[0]) if args.distill else None
    dense_bytes = args.bits and common.save_torch(model.state_dict(), Path(save_dir) / "dense.pt")
    original = common.count_params(model)
    rows = []
    for t in common.progress(args.thresholds, "sweep", "threshold"):
        keep, rescued = neurons_to_keep(means, t, args.multiple_of)
        pruned = remove_neurons(model, keep)
        row = {"threshold": t, "accuracy": common.accuracy(pruned, test_data)}
        if args.bias_compensation:
            pruned = remove_neurons(model, keep, means)
            row["compensated_accuracy"] = common.accuracy(pruned, test_data)
        if args.finetune_epochs:
            common.finetune(pruned, train_data, args, args.finetune_epochs, teacher, desc=f"fine-tuning at {t:.4g}")
            row["finetuned_accuracy"] = common.accuracy(pruned, test_data)
        if args.save_dir:
            common.save_torch(pruned.state_dict(), Path(args.save_dir) / f"activation-{t:g}.pt")
        new = common.count_params(pruned)
        if args.bits:
            row.update(compressed.compress(pruned, train_data, test_data, args, teacher,
                                           Path(save_dir) / f"compressed-{t:g}.bin", f"fine-tuning shared values at {t:.4g}"))
            row["times_smaller"] = dense_bytes / row["compressed_bytes"]
        row.update(original_params=original, new_params=new, hidden_widths=list(common.widths(pruned)[1:-1]),
                   kept_strongest_only=rescued,
                   inference_time_s=common.inference_time(pruned, test_data[0], args.threads),
                   size_reduction=100 * (1 - new / original))
        rows.append(row)
    return rows


def columns(compensated, finetuned, bits):
    percent, count = "{:.2f}%".format, "{:,}".format
    return [("Threshold", "threshold", "{:.4g}".format), ("Accuracy", "accuracy", percent),
            *([("Bias-compensated", "compensated_accuracy", percent)] if compensated else []),
            *([("Fine-tuned", "finetuned_accuracy", percent)] if finetuned else []),
            ("Original Params", "original_params", count), ("New Params", "new_params", count),
            ("Hidden Widths", "hidden_widths", lambda widths: "-".join(map(str, widths))),
            ("Inference Time (s)", "inference_time_s", "{:.4f}".format),
            ("Size Reduction", "size_reduction", percent),
            *(compressed.columns(finetuned) if bits else [])]


def plot(rows, baseline, plot_dir):
    plt = common.pyplot()
    compensated = "compensated_accuracy" in rows[0]
    curves = [("accuracy", "one-shot"), ("compensated_accuracy", "bias-compensated"),
              ("finetuned_accuracy", "bias-compensated, then fine-tuned" if compensated else "fine-tuned"),
              ("quantized_accuracy", "quantized"), ("quantized_finetuned_accuracy", "quantized, fine-tuned")]
    fig = common.accuracy_figure(rows, baseline, "size_reduction", "parameters", curves)
    fig.suptitle(f"Activation pruning, MLP 784-{'-'.join(map(str, rows[0]['hidden_widths']))}-10")
    common.save_figure(fig, plot_dir, "activation_pruning_accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    thresholds = [r["threshold"] for r in rows]
    for layer in range(len(rows[0]["hidden_widths"])):
        ax.plot(thresholds, [r["hidden_widths"][layer] for r in rows], "o-", label=f"hidden layer {layer + 1}")
    ax.set(xlabel="mean-activation threshold", ylabel="neurons left", ylim=(0, None),
           title="Activation pruning: width of each hidden layer")
    ax.legend()
    common.save_figure(fig, plot_dir, "activation_widths.png")


def main():
    p = common.parser(__doc__.split("\n\n")[0], THRESHOLDS)
    p.add_argument("--bias-compensation", action="store_true",
                   help="fold each removed neuron's mean activation into the next layer's bias")
    p.add_argument("--multiple-of", type=common.positive(int), default=1, metavar="N",
                   help="round each hidden width up to a multiple of N by also keeping the strongest neurons "
                        "below the threshold; 8 or 16 suit CPU vector units (default: 1, no rounding)")
    args = p.parse_args()
    model, train_data, test_data = common.setup(args)
    baseline = common.accuracy(model, test_data)
    with tempfile.TemporaryDirectory() as tmp:
        rows = sweep(model, train_data, test_data, args, args.save_dir or tmp)
    print(common.markdown_table(rows, columns(args.bias_compensation, bool(args.finetune_epochs), args.bits)))
    print(f"\nInference time: classifying all {len(test_data[1]):,} test images in one batch, median of repeats "
          f"after warm-up, {args.threads} threads.")
    if args.bits:
        print(compressed.note(args.bits))
    for r in rows:
        if r["kept_strongest_only"]:
            layers = ", ".join(str(i + 1) for i in r["kept_strongest_only"])
            print(f"At threshold {r['threshold']:g} no neuron of hidden layer {layers} reached it; "
                  "the strongest one was kept.")
    if args.json:
        common.write_json(args.json, common.settings(args), rows, dense_accuracy=baseline)
    if args.plot:
        plot(rows, baseline, args.plot_dir)


if __name__ == "__main__":
    common.run(main)
