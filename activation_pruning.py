"""Activation pruning: measure each hidden neuron's (or conv channel's) mean ReLU activation over the
training set, remove those below a threshold and rebuild genuinely smaller layers.

    python activation_pruning.py                                           # the default threshold sweep
    python activation_pruning.py --finetune-epochs 10 --bias-compensation  # and recover accuracy
    python activation_pruning.py --reduction 0.95 --steps 6 --finetune-epochs 4 --distill --prune-inputs
"""

import cli.startup  # noqa: F401, I001 -- first: settles what must be settled before torch is imported

import copy

import torch
import torch.nn as nn

import pruning
from cli import checkpoints, measured, options, outputs, plots, recipe, results, run, tables
from cli.progress import progress
from pruning import UserError

THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]
STEP_EPOCHS = 6  # fine-tuning a step in --steps without --finetune-epochs (30 after the last); chosen on validation
STEP_GROUP_LASSO, STEP_CRITERION = 0.01, "saliency"  # and the cut there; chosen on validation (README)
STEP_INPUT_DROPOUT = 0.1  # there with --prune-inputs; chosen so too
BASELINES = "the same widths, the units chosen at random, and each layer's by the norm of their weights."
FIGURES = ["activation_pruning_accuracy.png", "activation_pixels_kept.png", "activation_widths.png"]
PUBLISHED_LENET = [  # structured pruning of LeNet-300-100 on MNIST: (method, parameters kept %, test error %)
    ("VIB 2018", 3.6, 1.6), ("L0 2018", 10.0, 1.6), ("SBP 2017", 18.0, 1.6)]


def targets(args):
    return [(f"{kind_of(args)}{results.label(v)}", kind_of(args), v) for v in args.reduction or args.thresholds]


def model_files(args):
    names = ["dense.pt"]
    for name, _, _ in targets(args):
        names += [f"activation-{name}.pt"] + ([f"compressed-{name}.bin"] if args.bits else []) \
            + ([f"activation-{name}.onnx"] if args.onnx else [])
    return names


def sweep(model, train_data, validation, test_data, args, run):
    folder = outputs.seed_folder(args, args.seed)
    teacher = recipe.teacher(model, train_data, args)
    dense_bytes = outputs.save_model(model, folder / "dense.pt")
    original = pruning.count_params(model)
    source = lasso_trained(model, train_data, teacher, args) if args.group_lasso else model  # what is cut
    criterion = pruning.unit_saliency(train_data, batch_size=args.batch_size, seed=args.seed, teacher=teacher,
                                      temperature=args.temperature, weight=args.distill_weight) \
        if args.criterion == "saliency" else args.criterion
    x = train_data[0]
    means = None if args.reduction else pruning.mean_activations(model, x)
    rows = []
    for name, kind, target in progress(targets(args), "sweep", kind_of(args)):
        if args.reduction:
            pruned = pruning.activation_prune(source, x, target, prune_inputs=args.prune_inputs, criterion=criterion)
            row = {"reduction": target, **results.scores(pruned, validation, test_data)}
        else:
            pruned, rescued = pruning.remove_below(model, means, target, multiple_of=args.multiple_of, example=x[:1])
            row = {"threshold": target, **results.scores(pruned, validation, test_data), "kept_strongest_only": rescued}
            if args.bias_compensation:
                pruned, _ = pruning.remove_below(model, means, target, multiple_of=args.multiple_of, compensate=True,
                                                 example=x[:1])
                row.update(results.scores(pruned, validation, test_data, "compensated_accuracy"))
        if args.finetune_epochs:
            finetune = recipe.step_finetuner(train_data, args, teacher, f"{kind} {results.label(target)}")
            if args.steps > 1:
                pruned = pruning.activation_prune(source, x, target, steps=args.steps, finetune=finetune,
                                                  prune_inputs=args.prune_inputs, criterion=criterion)
            else:
                finetune(pruned)
            row.update(results.scores(pruned, validation, test_data, "finetuned_accuracy"))
        pruned.eval()
        outputs.save_model(pruned, folder / f"activation-{name}.pt")
        outputs.export_onnx(args, pruned, folder / f"activation-{name}.onnx")
        new = pruning.count_params(pruned)
        if args.bits:
            row.update(measured.compress(pruned, (train_data, validation, test_data), args, teacher,
                                         folder / f"compressed-{name}.bin", name=f"{kind} {results.label(target)}",
                                         dense_bytes=dense_bytes))
        if args.baselines:
            row.update(measured.unit_baselines(model, pruned, x, args, (validation, test_data)))
        if args.prune_inputs:
            row["kept_pixels"] = pruning.kept_inputs(pruned).tolist()
        row.update(original_params=original, new_params=new, input_width=pruning.widths(pruned)[0],
                   hidden_widths=list(pruning.widths(pruned)[1:-1]), flops=pruning.flops(pruned, test_data[0]),
                   **measured.timed(args, run, model, pruned, test_data[0]), size_reduction=100 * (1 - new / original))
        rows.append(row)
    return rows


def kind_of(args):
    return "reduction" if args.reduction else "threshold"


def lasso_trained(model, train_data, teacher, args):
    """A copy of model trained --group-lasso-epochs more with the group-lasso penalty of strength
    --group-lasso (and the --finetune-* settings, distilling with --distill): what the cut starts from."""
    trained = copy.deepcopy(model)
    penalty = pruning.group_lasso(trained, args.group_lasso, train_data[0][:1], prune_inputs=args.prune_inputs)
    return recipe.finetune(trained, train_data, args, args.group_lasso_epochs, teacher=teacher, desc="group lasso",
                           penalty=penalty)


def columns(reduction, compensated, finetuned, bits, pixels=False, speed=(), baselines=()):
    percent, count = "{:.2f}%".format, "{:,.0f}".format
    return [("Reduction", "reduction", results.label) if reduction else ("Threshold", "threshold", results.label),
            ("Accuracy", "accuracy", percent),
            *([("Bias-compensated", "compensated_accuracy", percent)] if compensated else []),
            *([("Fine-tuned", "finetuned_accuracy", percent)] if finetuned else []),
            ("Original Params", "original_params", count), ("New Params", "new_params", count),
            *([("Input Pixels", "input_width", count)] if pixels else []),
            ("Hidden Widths", "hidden_widths", lambda widths: "-".join(f"{w:.0f}" for w in widths)),
            ("Inference Time (s)", "inference_time_s", "{:.4f}".format),
            ("Size Reduction", "size_reduction", percent), *speed, *baselines,
            *(tables.compressed_columns(finetuned) if bits else [])]


def plot(model, rows, baseline, args):
    plt = plots.pyplot()
    compensated = "compensated_accuracy" in rows[0]
    curves = [("accuracy", "one-shot"), ("compensated_accuracy", "bias-compensated"),
              ("finetuned_accuracy", "bias-compensated, then fine-tuned" if compensated else "fine-tuned"),
              ("quantized_accuracy", "quantized"), ("quantized_finetuned_accuracy", "quantized, fine-tuned")]
    published = PUBLISHED_LENET if pruning.widths(model) == (784, 300, 100, 10) else []
    fig = plots.accuracy_figure(rows, baseline, "size_reduction", "parameters", curves, published)
    fig.suptitle(f"Activation pruning of the trained {tables.name_of(model)}"
                 + (": published structured LeNet-300-100 results as stars" if published else ""))
    outputs.figure(fig, args, FIGURES[0])

    if all(isinstance(r.get("kept_pixels"), list) for r in rows):
        fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3), squeeze=False)
        for ax, r in zip(axes[0], rows):
            kept = torch.zeros(784)
            kept[r["kept_pixels"]] = 1
            ax.imshow(kept.view(28, 28), cmap="gray_r", vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[],
                   title=f"{len(r['kept_pixels'])} pixels\n{r['size_reduction']:.2f}% fewer params")
        fig.suptitle("Input pixels kept (black)")
        outputs.figure(fig, args, FIGURES[1])

    if "threshold" not in rows[0]:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    thresholds = [r["threshold"] for r in rows]
    for layer in range(len(rows[0]["hidden_widths"])):
        ax.plot(thresholds, [r["hidden_widths"][layer] for r in rows], "o-", label=f"hidden layer {layer + 1}")
    ax.set(xlabel="mean-activation threshold", ylabel="units left", ylim=(0, None),
           title="Activation pruning: width of each hidden layer")
    ax.legend()
    outputs.figure(fig, args, FIGURES[2])


def main():
    p = options.parser(__doc__.split("\n\n")[0], THRESHOLDS)
    prune, frontier = p.groups["prune"], p.groups["methods"]
    frontier.add_argument("--bias-compensation", action="store_true",
                   help="fold each removed neuron's mean activation into the next layer's bias")
    prune.add_argument("--multiple-of", type=options.positive(int, 1024), default=1, metavar="N",
                   help="round each hidden width up to a multiple of N by also keeping the strongest neurons "
                        "below the threshold; 8 or 16 suit CPU vector units (default: 1, no rounding)")
    prune.add_argument("--reduction", type=options.number_in(float, 0, 1, open_low=True, open_high=True), nargs="+",
                   metavar="R",
                   help="instead of --thresholds, remove the fraction R of all parameters (e.g. 0.95), every layer "
                        "cut by the same factor")
    prune.add_argument("--prune-inputs", action="store_true",
                   help="with --reduction, remove input pixels as well, the least varying first, folding each "
                        "one's mean value into the first layer's bias")
    frontier.add_argument("--criterion", choices=["activation", "contribution", "saliency"],
                   help="with --reduction, what ranks the neurons: mean activation (a pixel's standard deviation), "
                        "or that times the norm of the outgoing weights (default: contribution, which keeps more "
                        "accuracy; saliency in --steps without --finetune-epochs; the threshold sweep always uses "
                        "mean activation), or 'saliency': the mean squared gradient of the fine-tuning loss with "
                        "respect to a gate on each unit")
    frontier.add_argument("--group-lasso", type=options.number_in(float, 0, 1.0), metavar="S",
                   help="with --reduction, first train the dense model --group-lasso-epochs more with a penalty of "
                        "S times the sum of every unit's weight norm (and every pixel's with --prune-inputs), so "
                        f"that it learns which units to spare before the cut (default: none, 0; {STEP_GROUP_LASSO} "
                        "in --steps without --finetune-epochs)")
    frontier.add_argument("--group-lasso-epochs", type=options.positive(int, options.MAX_EPOCHS), default=10,
                          metavar="N",
                   help="epochs of --group-lasso training (default: 10)")
    args = p.parse_args()
    if args.group_lasso and not args.reduction:
        raise UserError("--group-lasso takes --reduction")
    if args.reduction:
        if args.thresholds is not THRESHOLDS:
            raise UserError("give --thresholds or --reduction, not both")
        options.check_labels("--reduction", args.reduction)
        if args.multiple_of != 1:
            raise UserError("--multiple-of takes --thresholds, not --reduction")
    elif args.prune_inputs or args.criterion:
        raise UserError(f"{'--prune-inputs' if args.prune_inputs else '--criterion'} takes --reduction")
    if args.model not in ("mlp", "lenet5") and not args.reduction and not isinstance(
            checkpoints.given_model(args.model), nn.Sequential):
        raise UserError(f"--model {run.shown(args.model)}: its network joins tensors (a residual sum or a "
                        "concatenation), and the --thresholds sweep removes units of a chain: give --reduction")
    if args.model != "mlp" and (args.prune_inputs or args.bias_compensation):
        raise UserError(f"{'--prune-inputs' if args.prune_inputs else '--bias-compensation'} takes --model mlp")
    if args.reduction and options.steps_on_defaults(args):
        args.criterion = args.criterion or STEP_CRITERION
        args.group_lasso = STEP_GROUP_LASSO if args.group_lasso is None else args.group_lasso
        if args.prune_inputs and args.input_dropout is None:
            args.input_dropout = STEP_INPUT_DROPOUT
    args.criterion = args.criterion or "contribution"
    args.input_dropout = args.input_dropout or 0.0
    options.check_steps(args, "--reduction", STEP_EPOCHS)
    trained = []

    def run_one(args):
        model, train_data, validation, test_data = run.setup(args, state)
        rows = sweep(model, train_data, validation, test_data, args, state)
        trained.append(model)
        return rows, run.dense_results(args, model, train_data, validation, test_data)

    state = run.prepare(args, model_files(args), FIGURES)
    rows, dense = run.results_over_seeds(args, state, run_one,
                                         lambda rows, baseline: plot(trained[-1], rows, baseline, args))
    rescued = [f"At threshold {r['threshold']:g} no unit of hidden layer "
               f"{', '.join(str(i + 1) for i in r['kept_strongest_only'])} reached it; the strongest one was kept."
               for r in rows if isinstance(r.get("kept_strongest_only"), list) and r["kept_strongest_only"]]
    run.report(args, state, rows, dense,
               columns=columns(bool(args.reduction), args.bias_compensation and not args.reduction,
                               bool(args.finetune_epochs), args.bits, args.prune_inputs,
                               tables.speed_columns(args), tables.baseline_columns(rows)),
               baselines=BASELINES, closing=rescued)

if __name__ == "__main__":
    run.main(main)
