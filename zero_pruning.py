"""Zero pruning: set every weight with |w| < threshold to exactly zero (biases stay), optionally
fine-tune with the zeros held in place by pruning masks, and store the weights as CSR tensors.

    python zero_pruning.py                      # the default threshold sweep
    python zero_pruning.py --finetune-epochs 4  # and recover accuracy by fine-tuning
    python zero_pruning.py --sparsity 0.985 --steps 10 --finetune-epochs 2 --distill --bits 5
"""

import cli.startup  # noqa: F401, I001 -- first: settles what must be settled before torch is imported

import copy

import torch

import pruning
from cli import checkpoints, measured, options, outputs, plots, recipe, results, run, tables
from cli.progress import progress
from pruning import UserError

THRESHOLDS = options.ZERO_THRESHOLDS
PUBLISHED_LENET = [  # LeNet-300-100 on MNIST: (method, weights kept %, test error %)
    ("Han 2015", 8.0, 1.59), ("DNS 2016", 1.8, 1.99), ("Sparse VD 2017", 1.5, 1.92)]
FIGURES = ["weight_magnitudes.png", "zero_pruning_accuracy.png"]
STEP_EPOCHS, FINAL_EPOCHS = 4, 30  # fine-tuning in --steps without --finetune-epochs, chosen on validation (README)
STEP_VARIATIONAL_DROPOUT = 10.0  # its strength, first, in --steps without --finetune-epochs; chosen so too
BASELINES = "the same share of zeros, chosen at random, and by magnitude in each layer alike."


def n_of_m(text):
    """An argparse type: N:M, keep N of every M weights, 0 < N < M <= 64."""
    try:
        n, m = (int(v) for v in text.split(":"))
        return pruning.check_pattern((n, m), None)
    except ValueError:
        raise options.argparse.ArgumentTypeError(f"not N:M with 0 < N < M <= 64: {text!r}") from None


def targets(args):
    """(the row's name, its key and value as the user gave it) for each row of the sweep."""
    return [(f"{kind_of(args)}{results.label(v)}", kind_of(args), v) for v in args.sparsity or args.thresholds]


def kind_of(args):
    return "sparsity" if args.sparsity else "threshold"


def model_files(args):
    names = ["dense.pt"]
    for name, _, _ in targets(args):
        names += [f"csr-{name}.pt"] + ([f"compressed-{name}.bin"] if args.bits else []) \
            + ([f"zero-{name}.onnx"] if args.onnx else [])
    return names


def thresholds(model, args):
    """The threshold of each row: given, or the one that reaches the sparsity given; each distinct,
    and none that leaves nothing to compress. None for each row where saliency ranks the weights."""
    if args.criterion == "saliency" or args.one_shot:
        return [None] * len(args.sparsity)
    if not args.sparsity:
        chosen = args.thresholds
    else:
        chosen = [pruning.threshold_for_sparsity(model, s) for s in args.sparsity]
        for i, t in enumerate(chosen):
            if t in chosen[:i]:
                raise UserError(f"--sparsity {args.sparsity[chosen.index(t)]:g} and {args.sparsity[i]:g} select the "
                                f"same threshold, {t:.6g}, and so the same model; give values further apart")
    largest = pruning.magnitudes(model).max().item()
    if args.bits and any(t > largest for t in chosen):
        raise UserError(f"--bits: a threshold above {largest:.4g}, the largest weight's magnitude, zeroes every "
                        "weight and leaves nothing to compress; give smaller thresholds")
    return chosen


def sweep(model, train_data, validation, test_data, args, run):
    folder = outputs.seed_folder(args, args.seed)
    weights = pruning.count_weights(model)
    dense_bytes = outputs.save_model(model, folder / "dense.pt")
    teacher = recipe.teacher(model, train_data, args)
    source = dropout_trained(model, train_data, teacher, args) if args.variational_dropout else model  # what is cut
    saliency = pruning.obd_saliency(train_data, batch_size=args.batch_size, seed=args.seed, teacher=teacher,
                                    temperature=args.temperature, weight=args.distill_weight) \
        if args.criterion == "saliency" else None
    dense_saliencies = saliency(model) if saliency else None  # one pass, shared by every row
    calibration = measured.calibration_images(train_data, args) if args.one_shot else None
    rows = []
    chosen = thresholds(model, args)
    for (name, kind, value), t in zip(progress(targets(args), "sweep", kind_of(args)), chosen):
        if args.one_shot:
            pruned = pruning.one_shot(copy.deepcopy(model), calibration, value, method=args.one_shot,
                                      pattern=args.pattern)
            pruned = pruning.hold_masked(pruned, [layer.weight != 0 for layer in pruning.weighted(pruned)])
        elif saliency is None:
            pruned = pruning.hold_below(copy.deepcopy(model), t)
        else:
            pruned = pruning.hold_masked(copy.deepcopy(model), pruning.keep_largest(dense_saliencies, value))
        row = {kind: value, **({"threshold": t} if kind != "threshold" and t is not None else {}),
               **results.scores(pruned, validation, test_data)}
        if args.finetune_epochs:
            finetune = recipe.step_finetuner(train_data, args, teacher, f"{kind} {results.label(value)}")
            if args.steps > 1:
                pruned = pruning.zero_prune(copy.deepcopy(source), value, steps=args.steps, finetune=finetune,
                                            saliency=saliency)
            else:
                finetune(pruned)
            row.update(results.scores(pruned, validation, test_data, "finetuned_accuracy"))
        pruning.make_permanent(pruned)
        zeroed = pruning.count_zeros(pruned)
        row.update(original_params=weights, zeroed_params=zeroed, zero_percentage=100 * zeroed / weights,
                   dense_bytes=dense_bytes, csr_bytes=outputs.save_model(pruned, folder / f"csr-{name}.pt", "csr"),
                   csr_bytes_needed=pruning.csr_bytes_needed(pruned),
                   flops=pruning.flops(pruned, test_data[0]))
        if args.baselines:
            row.update(measured.zero_baselines(model, zeroed / weights, validation, test_data, args.seed))
        if args.speed:
            row.update(measured.timed(args, run, model, pruned, test_data[0]))
        outputs.export_onnx(args, pruned, folder / f"zero-{name}.onnx")
        if args.bits:
            row.update(measured.compress(pruned, (train_data, validation, test_data), args, teacher,
                                         folder / f"compressed-{name}.bin", name=f"{kind} {results.label(value)}",
                                         dense_bytes=dense_bytes))
            row["bits_per_nonzero"] = 8 * row["compressed_bytes"] / max(1, weights - zeroed)
        rows.append(row)
    return rows


def dropout_trained(model, train_data, teacher, args):
    """A copy of model trained --variational-dropout-epochs more with sparse variational dropout of
    strength --variational-dropout (and the --finetune-* settings, distilling with --distill), the
    weights it finds it can spare zeroed: what pruning in steps starts from."""
    with recipe.divergence_said("variational dropout"):
        return pruning.sparse_variational_dropout(
            copy.deepcopy(model), train_data, recipe.finetune_recipe(args, args.variational_dropout_epochs),
            strength=args.variational_dropout, teacher=teacher, progress=recipe.epoch_progress("variational dropout"))


def columns(rows, finetuned, bits, speed=()):
    percent, count = "{:.2f}%".format, "{:,.0f}".format
    given = "sparsity" if "sparsity" in rows[0] else None
    return [*([("Sparsity", "sparsity", results.label)] if given else []),
            *([("Threshold", "threshold", results.label)] if "threshold" in rows[0] else []),
            ("Accuracy", "accuracy", percent),
            *([("Fine-tuned", "finetuned_accuracy", percent)] if finetuned else []),
            ("Original Params", "original_params", count), ("Zeroed Params", "zeroed_params", count),
            ("Zero Percentage", "zero_percentage", percent),
            *tables.baseline_columns(rows),
            ("Dense File (B)", "dense_bytes", count), ("CSR File (B)", "csr_bytes", count), *speed,
            *(tables.compressed_columns(finetuned) if bits else [])]


def final_accuracy(row):
    return row.get("finetuned_accuracy", row["accuracy"])


def memory_impact(rows, baseline):
    """What the sparsest model that still works saves (within half a point of dense), from the
    measured numbers; and the sparsest overall, where that is another row."""
    def describe(r):
        acc = final_accuracy(r)
        verdict = "smaller" if r["csr_bytes"] < r["dense_bytes"] else "larger"
        name = f"sparsity {results.label(r['sparsity'])}" if "sparsity" in r else \
            f"threshold {results.label(r['threshold'])}"
        return (f"at {name}, {r['zero_percentage']:.2f}% of weights are zero; the CSR file is {r['csr_bytes']:,.0f} B, "
                f"{abs(1 - r['csr_bytes'] / r['dense_bytes']):.1%} {verdict} than the dense {r['dense_bytes']:,.0f} B, "
                f"at {acc:.2f}% accuracy ({acc - baseline:+.2f} points)")
    working = [r for r in rows if final_accuracy(r) >= baseline - 0.5]
    sparsest = max(rows, key=lambda r: r["zero_percentage"])
    if not working:
        return f"Memory impact: no row is within half a point of the dense model; the sparsest: {describe(sparsest)}."
    best = max(working, key=lambda r: r["zero_percentage"])
    line = f"Memory impact: the sparsest model within half a point of the dense one: {describe(best)}."
    if best is not sparsest:
        line += f"\nThe sparsest overall: {describe(sparsest)}."
    return line


def plot(model, rows, baseline, args):
    plt = plots.pyplot()
    magnitudes = pruning.magnitudes(model).cpu()
    fig, ax = plt.subplots(figsize=(8, 4))
    lines = [r for r in rows if "threshold" in r]  # none where saliency ranked the weights
    right = 1.5 * max([r["threshold"] for r in lines] or [0]) or magnitudes.max().item()
    counts, _, _ = ax.hist(magnitudes.numpy(), bins=150, range=(0, right), color="tab:blue")
    for i, r in enumerate(lines):
        ax.axvline(r["threshold"], color="tab:red", lw=0.8, ls="--")
        ax.annotate(f"{r['zero_percentage']:.2f}%", (r["threshold"], 1), xycoords=("data", "axes fraction"),
                    xytext=(2, -12 - 10 * (i % 2)), textcoords="offset points", color="tab:red", fontsize=8)
    hidden = (magnitudes > right).sum().item()
    ax.set(xlim=(0, right), ylim=(0, 1.2 * counts.max()), ylabel="number of weights",
           xlabel=f"|w|  ({hidden:,} weights above {right:.3g} not shown)",
           title=f"Weight magnitudes, trained {tables.name_of(model)}: {len(magnitudes):,} weights\n"
                 "red: pruning thresholds, each with the share of weights below it")
    outputs.figure(fig, args, FIGURES[0])

    curves = [("accuracy", "one-shot"), ("finetuned_accuracy", "fine-tuned"), ("quantized_accuracy", "quantized"),
              ("quantized_finetuned_accuracy", "quantized, fine-tuned")]
    published = PUBLISHED_LENET if pruning.widths(model) == (784, 300, 100, 10) else []
    fig = plots.accuracy_figure(rows, baseline, "zero_percentage", "weights", curves, published)
    fig.suptitle(f"Zero pruning, {tables.name_of(model)}"
                 + (": published LeNet-300-100 results as stars" if published else ""))
    outputs.figure(fig, args, FIGURES[1])


def main():
    p = options.parser(__doc__.split("\n\n")[0], THRESHOLDS)
    prune, frontier = p.groups["prune"], p.groups["methods"]
    prune.add_argument("--sparsity", type=options.number_in(float, 0, 1, open_high=True), nargs="+", metavar="S",
                   help="instead of --thresholds, the fractions of weights to zero (e.g. 0.9 0.95); "
                        "each is turned into the threshold that reaches it")
    frontier.add_argument("--criterion", choices=["magnitude", "saliency"], default="magnitude",
                   help="what ranks the weights toward a --sparsity: their magnitude (default), or 'saliency': "
                        "w^2 times the mean squared gradient of the fine-tuning loss over the training images "
                        "(Optimal Brain Damage with the Fisher's diagonal), measured again before each step")
    frontier.add_argument("--variational-dropout", type=options.number_in(float, 0, 1000), metavar="S",
                   help="with --steps, first train the dense model --variational-dropout-epochs more with sparse "
                        "variational dropout, its prior's weight S (1: the variational bound; more zeroes more), and "
                        "zero the weights it finds it can spare (default: 10 when --finetune-epochs is not given, "
                        "else none; 0: none)")
    prune.add_argument("--one-shot", choices=pruning.ONE_SHOT_METHODS, metavar="METHOD",
                   help="prune each --sparsity with no training, from --calibration training images: magnitude "
                        "(global), wanda (|w| times its input's norm) or reconstruct (each layer's kept weights "
                        "corrected toward the dense network's outputs, SparseGPT-style); each layer at the sparsity "
                        "global magnitude gives it. With --finetune-epochs, also fine-tuned after")
    prune.add_argument("--pattern", type=n_of_m, metavar="N:M",
                       help="with --one-shot, keep N of every M consecutive weights of each row instead "
                            "(2:4: sparsity 0.5)")
    prune.add_argument("--calibration", type=options.positive(int, 60_000), default=pruning.CALIBRATION, metavar="N",
                   help=f"training images --one-shot measures on (default: {pruning.CALIBRATION})")
    frontier.add_argument("--variational-dropout-epochs", type=options.positive(int, options.MAX_EPOCHS), default=10,
                   metavar="N", help="epochs of --variational-dropout training (default: 10)")
    args = p.parse_args()
    if args.variational_dropout and args.steps == 1:
        raise UserError("--variational-dropout takes --steps 2 or more")
    if args.variational_dropout is None and options.steps_on_defaults(args):
        args.variational_dropout = STEP_VARIATIONAL_DROPOUT
    args.input_dropout = args.input_dropout or 0.0
    if args.pattern and not args.one_shot:
        raise UserError("--pattern takes --one-shot")
    if args.calibration != pruning.CALIBRATION and not args.one_shot:
        raise UserError("--calibration takes --one-shot")
    if args.one_shot == "reconstruct":
        if args.model in ("mlp", "lenet5"):
            with torch.device("meta"):  # its shapes alone, whatever its size
                need = pruning.calibration_needed(checkpoints.new_model(args), torch.zeros(1, 784))
        else:
            need = pruning.calibration_needed(checkpoints.given_model(args.model), torch.zeros(1, 784))
        if args.calibration < need:
            raise UserError(f"--calibration {args.calibration:,}: reconstructing this network needs at least {need:,} "
                            "images (a row of calibration inputs for every 4 inputs of a layer)")
    if args.calibration > 60_000 - args.validation:
        raise UserError(f"--calibration {args.calibration:,}: the training set holds {60_000 - args.validation:,} "
                        f"images once --validation {args.validation:,} are held out")
    if args.one_shot:
        if args.steps > 1 or args.criterion == "saliency" or args.variational_dropout:
            raise UserError("--one-shot prunes in one step by its own criterion: give no --steps, --criterion or "
                            "--variational-dropout")
        if args.pattern:
            n, m = args.pattern
            if args.sparsity not in (None, [1 - n / m]):
                raise UserError(f"--pattern {n}:{m} zeroes {1 - n / m:g} of the weights; give no other --sparsity")
            args.sparsity = [1 - n / m]
        elif not args.sparsity:
            raise UserError("--one-shot takes --sparsity (or --pattern)")
    if args.criterion == "saliency" and not args.sparsity:
        raise UserError("--criterion saliency ranks the weights toward a --sparsity; --thresholds are magnitudes")
    options.check_steps(args, "--sparsity", STEP_EPOCHS, FINAL_EPOCHS)
    if args.sparsity:
        if args.thresholds is not THRESHOLDS:
            raise UserError("give --thresholds or --sparsity, not both")
        options.check_labels("--sparsity", args.sparsity)
    trained = []

    def run_one(args):
        model, train_data, validation, test_data = run.setup(args, state)
        rows = sweep(model, train_data, validation, test_data, args, state)
        trained.append(model)
        return rows, run.dense_results(args, model, train_data, validation, test_data)

    state = run.prepare(args, model_files(args), FIGURES)
    rows, dense = run.results_over_seeds(args, state, run_one,
                                         lambda rows, baseline: plot(trained[-1], rows, baseline, args))
    notes = [f"One-shot: {args.one_shot}" + (f", {args.pattern[0]}:{args.pattern[1]} pattern" if args.pattern else "")
             + f", from {args.calibration:,} training images, with no training"
             + (f"; Fine-tuned: then {args.finetune_epochs} epochs, the zeros held." if args.finetune_epochs else ".")
             ] if args.one_shot else []
    notes.append("Sizes are the files torch.save writes: dense fp32, and CSR with fp32 values and int32 indices.")
    run.report(args, state, rows, dense,
               columns=columns(rows, bool(args.finetune_epochs), args.bits, tables.speed_columns(args)),
               notes=notes, baselines=BASELINES, closing=[memory_impact(rows, dense["accuracy"])])

if __name__ == "__main__":
    run.main(main)
