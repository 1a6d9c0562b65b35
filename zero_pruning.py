"""Zero pruning: set every weight with |w| < threshold to exactly zero (biases stay), optionally
fine-tune with the zeros held in place by pruning masks, and store the weights as CSR tensors.

    python zero_pruning.py                      # the default threshold sweep
    python zero_pruning.py --finetune-epochs 4  # and recover accuracy by fine-tuning
"""

import startup  # noqa: F401, I001 -- first: settles what must be settled before torch is imported

import copy
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.utils.prune as prune

import common
import files
import compressed

THRESHOLDS = [0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.10]
PUBLISHED_LENET = [  # LeNet-300-100 on MNIST: (method, weights kept %, test error %)
    ("Han 2015", 8.0, 1.59), ("DNS 2016", 1.8, 1.99), ("Sparse VD 2017", 1.5, 1.92)]


def prune_below(model, threshold):
    """A copy of model whose weights with |w| < threshold are held at zero by pruning masks."""
    pruned = copy.deepcopy(model)
    for layer in common.linears(pruned):
        prune.custom_from_mask(layer, "weight", layer.weight.abs() >= threshold)
    return pruned


def make_permanent(model):
    """Fold the pruning masks into the weights, leaving ordinary nn.Linear layers."""
    for layer in common.linears(model):
        prune.remove(layer, "weight")
    return model


def threshold_for_sparsity(model, sparsity):
    """The smallest threshold that zeroes at least that fraction of all weights."""
    magnitudes = torch.cat([layer.weight.detach().abs().flatten() for layer in common.linears(model)])
    k = math.ceil(round(sparsity * len(magnitudes), 6))  # rounded first: 5/6 of 6 is 5.000000000000001
    return 0.0 if k == 0 else torch.nextafter(magnitudes.kthvalue(k).values, torch.tensor(1.0)).item()


def prune_in_steps(model, sparsity, steps, finetune):
    """Prune toward `sparsity` in steps on the cubic schedule: each step holds at zero the weights
    smallest in magnitude over all layers together, then finetune(pruned, step) recovers from it.
    Returns the pruned copy with its masks in place, as prune_below does."""
    pruned = model
    for step, s in enumerate(common.cubic_schedule(sparsity, steps), 1):
        if step > 1:
            make_permanent(pruned)
        pruned = prune_below(pruned, threshold_for_sparsity(pruned, s))
        finetune(pruned, step)
    return pruned


def count_zeros(model):
    return sum((layer.weight == 0).sum().item() for layer in common.linears(model))


# Sparse storage and inference ---------------------------------------------------------

def to_csr(weight):
    """CSR with int32 indices: 4 bytes per non-zero value, 4 per column index, 4 per row pointer."""
    csr = weight.detach().cpu().to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape,
                                   check_invariants=True)


def csr_bytes_needed(model):
    """The least any CSR file of model holds: fp32 values, int32 indices and row pointers, fp32 biases."""
    return sum(8 * layer.weight.count_nonzero().item() + 4 * (layer.out_features + 1) + 4 * layer.out_features
               for layer in common.linears(model))


def save_sparse(model, path):
    """Save the weights as CSR and the biases dense, all layers' indices in one int32 tensor and all
    their numbers in one fp32 tensor, so the file's framing stays small. Returns its size in bytes."""
    layers = common.linears(model)
    weights = [to_csr(layer.weight) for layer in layers]
    return files.save_torch({
        "widths": list(common.widths(model)),
        "indices": torch.cat([t for w in weights for t in (w.crow_indices(), w.col_indices())]),
        "numbers": torch.cat([w.values() for w in weights] + [layer.bias.detach().cpu() for layer in layers]),
    }, path)


def load_sparse(path):
    """The dense nn.Sequential stored by save_sparse."""
    saved = torch.load(path, weights_only=True)
    model = common.mlp(saved["widths"])
    indices, numbers = saved["indices"], saved["numbers"]
    layers = common.linears(model)
    with torch.no_grad():
        for layer in layers:
            crow, indices = indices[:layer.out_features + 1], indices[layer.out_features + 1:]
            nnz = crow[-1].item()
            col, indices, values, numbers = indices[:nnz], indices[nnz:], numbers[:nnz], numbers[nnz:]
            layer.weight.copy_(torch.sparse_csr_tensor(crow, col, values, layer.weight.shape,
                                                       check_invariants=True).to_dense())
        for layer, bias in zip(layers, numbers.split([layer.out_features for layer in layers])):
            layer.bias.copy_(bias)
    return model


def sparse_forward(model):
    """model's forward pass on CSR weights (CPU). Activations stay feature-major, so every layer
    is one CSR @ dense product, the fast direction for torch.sparse. Turning the batch
    feature-major is a copy anyway, and it keeps only the inputs that some weight reads."""
    layers = common.linears(model)
    first = layers[0].weight.detach().cpu()
    used = first.ne(0).any(0).nonzero().squeeze(1)
    weights = [to_csr(first[:, used])] + [to_csr(layer.weight) for layer in layers[1:]]
    biases = [layer.bias.detach().cpu()[:, None] for layer in layers]

    def forward(x):
        h = x.T[used]
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            h = torch.addmm(bias, weight, h)
            if i < len(weights) - 1:
                h.relu_()
        return h.T
    return forward


# The sweep ----------------------------------------------------------------------------

def sweep(model, train_data, test_data, args, save_dir):
    weights = common.count_weights(model)
    dense_bytes = files.save_torch(model.state_dict(), save_dir / "dense.pt")
    teacher = common.logits(model, train_data[0]) if args.distill else None
    rows = []
    for t, sparsity in common.progress(targets(args), "sweep", "threshold"):
        pruned = prune_below(model, t)
        row = {"threshold": t, "accuracy": common.accuracy(pruned, test_data)}
        if args.finetune_epochs:
            finetune = common.step_finetuner(train_data, args, teacher, common.label(t))
            if args.steps > 1:
                pruned = prune_in_steps(model, sparsity, args.steps, finetune)
            else:
                finetune(pruned, 1)
            row["finetuned_accuracy"] = common.accuracy(pruned, test_data)
        make_permanent(pruned)
        zeroed = count_zeros(pruned)
        row.update(original_params=weights, zeroed_params=zeroed, zero_percentage=100 * zeroed / weights,
                   dense_bytes=dense_bytes, csr_bytes=save_sparse(pruned, save_dir / f"csr-{t:g}.pt"),
                   csr_bytes_needed=csr_bytes_needed(pruned))
        if args.bits:
            row.update(compressed.compress(pruned, train_data, test_data, args, teacher, save_dir / f"compressed-{t:g}.bin",
                                           f"fine-tuning shared values at {common.label(t)}", dense_bytes))
            row["bits_per_nonzero"] = 8 * row["compressed_bytes"] / (weights - zeroed)
        rows.append(row)
    return rows


def columns(finetuned, bits):
    percent, count = "{:.2f}%".format, "{:,.0f}".format
    return [("Threshold", "threshold", common.label), ("Accuracy", "accuracy", percent),
            *([("Fine-tuned", "finetuned_accuracy", percent)] if finetuned else []),
            ("Original Params", "original_params", count), ("Zeroed Params", "zeroed_params", count),
            ("Zero Percentage", "zero_percentage", percent),
            ("Dense File (B)", "dense_bytes", count), ("CSR File (B)", "csr_bytes", count),
            *(compressed.columns(finetuned) if bits else [])]


def memory_impact(rows, baseline):
    """One line on what the sparsest row saves, from the measured numbers."""
    r = max(rows, key=lambda row: row["zero_percentage"])
    acc = r.get("finetuned_accuracy", r["accuracy"])
    verdict = "smaller" if r["csr_bytes"] < r["dense_bytes"] else "larger"
    return (f"Memory impact: at threshold {common.label(r['threshold'])}, {r['zero_percentage']:.1f}% of weights are zero; "
            f"the CSR file is {r['csr_bytes']:,.0f} B, {abs(1 - r['csr_bytes'] / r['dense_bytes']):.1%} {verdict} "
            f"than the dense {r['dense_bytes']:,.0f} B, at {acc:.2f}% accuracy ({acc - baseline:+.2f} points).")


def plot(model, rows, baseline, plot_dir):
    plt = common.pyplot()

    magnitudes = torch.cat([layer.weight.detach().abs().flatten().cpu() for layer in common.linears(model)])
    fig, ax = plt.subplots(figsize=(7, 4))
    right = 1.5 * max(r["threshold"] for r in rows) or magnitudes.max().item()
    counts, _, _ = ax.hist(magnitudes.numpy(), bins=150, range=(0, right), color="tab:blue")
    for r in rows:
        ax.axvline(r["threshold"], color="tab:red", lw=0.8, ls="--")
        ax.annotate(f"{r['zero_percentage']:.0f}%", (r["threshold"], 1), xycoords=("data", "axes fraction"),
                    xytext=(2, -12), textcoords="offset points", color="tab:red", fontsize=8)
    hidden = (magnitudes > right).sum().item()
    ax.set(xlim=(0, right), ylim=(0, 1.15 * counts.max()), ylabel="number of weights",
           xlabel=f"|w|  ({hidden:,} weights above {right:.3g} not shown)",
           title=f"Weight magnitudes of the trained MLP ({len(magnitudes):,} weights)\n"
                 "red: pruning thresholds, each with the share of weights below it")
    common.save_figure(fig, plot_dir, "weight_magnitudes.png")

    curves = [("accuracy", "one-shot"), ("finetuned_accuracy", "fine-tuned"), ("quantized_accuracy", "quantized"),
              ("quantized_finetuned_accuracy", "quantized, fine-tuned")]
    published = PUBLISHED_LENET if common.widths(model) == (784, 300, 100, 10) else []
    fig = common.accuracy_figure(rows, baseline, "zero_percentage", "weights", curves, published)
    fig.suptitle(f"Zero pruning, MLP {'-'.join(map(str, common.widths(model)))}"
                 + (": published LeNet-300-100 results as stars" if published else ""))
    common.save_figure(fig, plot_dir, "zero_pruning_accuracy.png")


def targets(args):
    """(threshold, sparsity or None) for each row of the sweep."""
    return list(zip(args.thresholds, args.sparsity or [None] * len(args.thresholds)))


def main():
    p = common.parser(__doc__.split("\n\n")[0], THRESHOLDS)
    p.add_argument("--sparsity", type=common.number_in(float, 0, 1, open_high=True), nargs="+", metavar="S",
                   help="instead of --thresholds, the fractions of weights to zero (e.g. 0.9 0.95); "
                        "each is turned into the threshold that reaches it")
    args = p.parse_args()
    common.check_steps(args, "--sparsity")
    if args.sparsity:
        if args.thresholds is not THRESHOLDS:
            raise common.UserError("give --thresholds or --sparsity, not both")
        common.check_labels("--sparsity", args.sparsity)
    models = []

    def run_one():
        model, train_data, test_data = common.setup(args)
        if args.sparsity:
            args.thresholds = [threshold_for_sparsity(model, s) for s in args.sparsity]
        with tempfile.TemporaryDirectory() as tmp:
            rows = sweep(model, train_data, test_data, args, common.save_dir(args) or Path(tmp))
        models.append(model)
        return rows, common.accuracy(model, test_data)

    rows, baseline = common.results_over_seeds(
        args, run_one, lambda rows, baseline: plot(models[-1], rows, baseline, args.plot_dir))
    print(common.markdown_table(rows, columns(bool(args.finetune_epochs), args.bits)))
    print("\nSizes are the files torch.save writes: dense fp32, and CSR with fp32 values and int32 indices.")
    if args.bits:
        print(compressed.note(args.bits))
    print(memory_impact(rows, baseline))


if __name__ == "__main__":
    common.run(main)
