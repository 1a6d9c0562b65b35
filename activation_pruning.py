"""Activation pruning: measure each hidden neuron's mean ReLU activation over the training set,
remove the neurons below a threshold and rebuild genuinely smaller nn.Linear layers.

    python activation_pruning.py                                           # the default threshold sweep
    python activation_pruning.py --finetune-epochs 10 --bias-compensation  # and recover accuracy
    python activation_pruning.py --reduction 0.95 --steps 6 --finetune-epochs 4 --distill --prune-inputs
"""

import startup  # noqa: F401, I001 -- first: settles what must be settled before torch is imported

import math
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

import common
import files
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
def remove_neurons(model, keep, means=None, inputs=None):
    """A smaller model without the hidden neurons whose keep entry is False: their rows go from
    one layer, their columns from the next. With means (bias compensation), every removed neuron's
    mean activation times its outgoing weights is folded into the next layer's bias. inputs, a
    mask over the model's input pixels and each pixel's mean value, removes the pixels masked out
    the same way, always folding their means: a constant pixel goes without changing any output."""
    layers = common.linears(model)
    device = layers[0].weight.device
    everything = [torch.ones(n, dtype=torch.bool, device=device) for n in (layers[0].in_features, layers[-1].out_features)]
    masks = [inputs[0] if inputs else everything[0], *keep, everything[1]]
    folded = [inputs[1] if inputs else None, *(means or [None] * len(keep))]
    rows = [m.nonzero().squeeze(1) for m in masks]
    pixels = common.kept_inputs(model)[rows[0]] if inputs or isinstance(model[0], common.KeepInputs) else None
    smaller = common.mlp([len(r) for r in rows], pixels).to(device)
    for i, (old, new) in enumerate(zip(layers, common.linears(smaller))):
        bias = old.bias.clone()
        if folded[i] is not None:
            gone = ~masks[i]
            bias += old.weight[:, gone] @ folded[i][gone]
        new.weight.copy_(old.weight[rows[i + 1]][:, rows[i]])
        new.bias.copy_(bias[rows[i + 1]])
    return smaller


# Shrinking to a size in steps ---------------------------------------------------------

@torch.no_grad()
def scores(model, x, criterion):
    """Per layer of neurons, the input pixels first: how much each neuron carries, and its mean
    value. 'activation': a hidden neuron's mean activation, a pixel's standard deviation over x
    (a constant pixel carries no information, however bright); 'contribution': that times the
    norm of the neuron's outgoing weights, what it actually passes on."""
    pixels = x.index_select(1, common.kept_inputs(model))
    activations = mean_activations(model, x)
    strength = [pixels.std(0), *activations]
    if criterion == "contribution":
        strength = [s * layer.weight.norm(dim=0) for s, layer in zip(strength, common.linears(model))]
    return strength, [pixels.mean(0), *activations]


def strongest(strength, width):
    keep = torch.zeros_like(strength, dtype=torch.bool)
    keep[strength.argsort(descending=True, stable=True)[:width]] = True
    return keep


def params_of(widths):
    return sum(n_in * n_out + n_out for n_in, n_out in zip(widths[:-1], widths[1:]))


def target_widths(widths, max_params, prune_inputs):
    """Every layer's width (the inputs' too with prune_inputs; never the outputs') scaled by one
    factor, the largest that leaves at most max_params parameters: the cut spread evenly."""
    def scaled(factor):
        fixed = {len(widths) - 1} | (set() if prune_inputs else {0})
        return [w if i in fixed else max(1, math.floor(factor * w)) for i, w in enumerate(widths)]
    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if params_of(scaled(middle)) <= max_params else (low, middle)
    return scaled(low)


def shrink(model, widths, x, args):
    """model cut to `widths` (inputs first), keeping the strongest neurons of each layer by args.criterion."""
    strength, means = scores(model, x, args.criterion)
    keep = [strongest(s, w) for s, w in zip(strength, widths[:-1])]
    inputs = (keep[0], means[0]) if args.prune_inputs else None
    return remove_neurons(model, keep[1:], means[1:] if args.bias_compensation else None, inputs)


def shrink_in_steps(model, reduction, x, args, finetune):
    """Remove the fraction `reduction` of the parameters in args.steps steps on the cubic schedule,
    re-measuring the neurons before each step and calling finetune(model, step) after it."""
    widths, original = common.widths(model), common.count_params(model)
    pruned = model
    for step, r in enumerate(common.cubic_schedule(reduction, args.steps), 1):
        pruned = shrink(pruned, target_widths(widths, (1 - r) * original, args.prune_inputs), x, args)
        finetune(pruned, step)
    return pruned


# The sweep ----------------------------------------------------------------------------

def sweep(model, train_data, test_data, args, save_dir):
    teacher = common.logits(model, train_data[0]) if args.distill else None
    dense_bytes = args.bits and files.save_torch(model.state_dict(), Path(save_dir) / "dense.pt")
    original = common.count_params(model)
    means = None if args.reduction else mean_activations(model, train_data[0])
    rows = []
    for target in common.progress(args.reduction or args.thresholds, "sweep",
                                  "reduction" if args.reduction else "threshold"):
        label = common.label(target)
        if args.reduction:
            widths = target_widths(common.widths(model), (1 - target) * original, args.prune_inputs)
            pruned = shrink(model, widths, train_data[0], args)
            row = {"reduction": target, "accuracy": common.accuracy(pruned, test_data)}
        else:
            keep, rescued = neurons_to_keep(means, target, args.multiple_of)
            pruned = remove_neurons(model, keep)
            row = {"threshold": target, "accuracy": common.accuracy(pruned, test_data), "kept_strongest_only": rescued}
            if args.bias_compensation:
                pruned = remove_neurons(model, keep, means)
                row["compensated_accuracy"] = common.accuracy(pruned, test_data)
        if args.finetune_epochs:
            finetune = common.step_finetuner(train_data, args, teacher, label)
            if args.steps > 1:
                pruned = shrink_in_steps(model, target, train_data[0], args, finetune)
            else:
                finetune(pruned, 1)
            row["finetuned_accuracy"] = common.accuracy(pruned, test_data)
        if args.save_dir:
            files.save_torch(pruned.state_dict(), Path(save_dir) / f"activation-{target:g}.pt")
        new = common.count_params(pruned)
        if args.bits:
            row.update(compressed.compress(pruned, train_data, test_data, args, teacher,
                                           Path(save_dir) / f"compressed-{target:g}.bin",
                                           f"fine-tuning shared values at {label}", dense_bytes))
        if args.prune_inputs:
            row["kept_pixels"] = common.kept_inputs(pruned).tolist()
        row.update(original_params=original, new_params=new, input_width=common.widths(pruned)[0],
                   hidden_widths=list(common.widths(pruned)[1:-1]),
                   inference_time_s=common.inference_time(pruned, test_data[0], args.threads),
                   size_reduction=100 * (1 - new / original))
        rows.append(row)
    return rows


def columns(reduction, compensated, finetuned, bits):
    percent, count = "{:.2f}%".format, "{:,.0f}".format
    return [("Reduction", "reduction", common.label) if reduction else ("Threshold", "threshold", common.label),
            ("Accuracy", "accuracy", percent),
            *([("Bias-compensated", "compensated_accuracy", percent)] if compensated else []),
            *([("Fine-tuned", "finetuned_accuracy", percent)] if finetuned else []),
            ("Original Params", "original_params", count), ("New Params", "new_params", count),
            *([("Input Pixels", "input_width", count)] if reduction else []),
            ("Hidden Widths", "hidden_widths", lambda widths: "-".join(f"{w:.0f}" for w in widths)),
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

    if all(isinstance(r.get("kept_pixels"), list) for r in rows):
        fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3), squeeze=False)
        for ax, r in zip(axes[0], rows):
            kept = torch.zeros(784)
            kept[r["kept_pixels"]] = 1
            ax.imshow(kept.view(28, 28), cmap="gray_r", vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[], title=f"{len(r['kept_pixels'])} pixels\n{r['size_reduction']:.1f}% fewer params")
        fig.suptitle("Input pixels kept (black)")
        common.save_figure(fig, plot_dir, "activation_pixels_kept.png")

    if "threshold" not in rows[0]:
        return
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
    p.add_argument("--multiple-of", type=common.positive(int, 1024), default=1, metavar="N",
                   help="round each hidden width up to a multiple of N by also keeping the strongest neurons "
                        "below the threshold; 8 or 16 suit CPU vector units (default: 1, no rounding)")
    p.add_argument("--reduction", type=common.number_in(float, 0, 1, open_low=True, open_high=True), nargs="+", metavar="R",
                   help="instead of --thresholds, remove the fraction R of all parameters (e.g. 0.95), every layer "
                        "cut by the same factor")
    p.add_argument("--prune-inputs", action="store_true",
                   help="with --reduction, remove input pixels as well, the least varying first, folding each "
                        "one's mean value into the first layer's bias")
    p.add_argument("--criterion", choices=["activation", "contribution"],
                   help="with --reduction, what ranks the neurons: mean activation (a pixel's standard deviation), "
                        "or that times the norm of the outgoing weights (default: contribution, which keeps more "
                        "accuracy; the threshold sweep always uses mean activation)")
    args = p.parse_args()
    if args.reduction:
        if args.thresholds is not THRESHOLDS:
            raise common.UserError("give --thresholds or --reduction, not both")
        common.check_labels("--reduction", args.reduction)
        if args.multiple_of != 1:
            raise common.UserError("--multiple-of takes --thresholds, not --reduction")
    elif args.prune_inputs or args.criterion:
        raise common.UserError(f"{'--prune-inputs' if args.prune_inputs else '--criterion'} takes --reduction")
    args.criterion = args.criterion or "contribution"
    common.check_steps(args, "--reduction")
    test_images = []

    def run_one():
        model, train_data, test_data = common.setup(args)
        with tempfile.TemporaryDirectory() as tmp:
            rows = sweep(model, train_data, test_data, args, common.save_dir(args) or Path(tmp))
        test_images.append(len(test_data[1]))
        return rows, common.accuracy(model, test_data)

    rows, baseline = common.results_over_seeds(args, run_one, lambda rows, baseline: plot(rows, baseline, args.plot_dir))
    print(common.markdown_table(rows, columns(bool(args.reduction), args.bias_compensation and not args.reduction,
                                              bool(args.finetune_epochs), args.bits)))
    print(f"\nInference time: classifying all {test_images[0]:,} test images in one batch, median of repeats "
          f"after warm-up, {args.threads} threads.")
    if args.bits:
        print(compressed.note(args.bits))
    for r in rows:
        if isinstance(r.get("kept_strongest_only"), list) and r["kept_strongest_only"]:
            layers = ", ".join(str(i + 1) for i in r["kept_strongest_only"])
            print(f"At threshold {r['threshold']:g} no neuron of hidden layer {layers} reached it; "
                  "the strongest one was kept.")


if __name__ == "__main__":
    common.run(main)
