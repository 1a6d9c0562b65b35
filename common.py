"""The command line both pruning scripts share, past their options (options.py): checks of every
destination before the work, the trained model cached by its settings, runs over seeds, and
one-line errors. The pruning itself is the library's (pruning/)."""

import contextlib
import copy
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

from cli import checkpoints, options, outputs, results, startup
from pruning import data, files, inference, measure, training
from pruning import model as models
from pruning.files import UserError, shown

log = logging.getLogger("pruning")


def train(model, data, recipe, *, teacher=None, desc="training", penalty=None):
    """training.train with a progress bar, and divergence said in one line."""
    with divergence_said(desc):
        return training.train(model, data, recipe, teacher=teacher, progress=epoch_progress(desc), penalty=penalty)


def finetune_recipe(args, epochs):
    """Fine-tuning's recipe: --finetune-lr, --batch-size, --seed, --temperature, --distill-weight,
    --bf16, --shift, --input-dropout, for `epochs`."""
    return training.Recipe(epochs=epochs, lr=args.finetune_lr, batch_size=args.batch_size, seed=args.seed,
                           temperature=args.temperature, distill_weight=args.distill_weight, bf16=args.bf16,
                           shift=args.shift, input_dropout=args.input_dropout)


def teacher(model, train_data, args):
    """What fine-tuning distils from with --distill: the dense model's logits on the training images,
    or with --shift a frozen copy of it, to judge each batch's shifted images; None without --distill."""
    if not args.distill:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False) if args.shift else training.logits(model, train_data[0])


def epoch_progress(desc):
    """A `progress` for training: a bar or log line per epoch, named desc."""
    return lambda epochs: progress(epochs, desc, "epoch")


@contextlib.contextmanager
def divergence_said(desc):
    """Training inside that diverges ends the run in one line naming desc, not a traceback."""
    try:
        yield
    except training.Diverged as e:
        raise UserError(f"{desc} diverged: {e}") from None


def finetune(model, train_data, args, epochs, teacher=None, desc="fine-tuning", penalty=None):
    """Fine-tune with the --finetune-* settings and --input-dropout, distilling from teacher (None
    without --distill)."""
    return train(model, train_data, finetune_recipe(args, epochs), teacher=teacher, desc=desc, penalty=penalty)


def step_finetuner(train_data, args, teacher, name):
    """finetune(model) for pruning in args.steps steps: --finetune-epochs after each step,
    --final-epochs after the last."""
    step = 0

    def finetune_step(model):
        nonlocal step
        step += 1
        epochs = args.final_epochs if step == args.steps else args.finetune_epochs
        finetune(model, train_data, args, epochs, teacher,
                 f"fine-tuning at {name}" + (f", step {step}/{args.steps}" if args.steps > 1 else ""))
    return finetune_step


# A run ------------------------------------------------------------------------------------

def prepare(args, model_files, figures):
    """Before any work: check the arguments and every destination of the run. model_files: the
    names written in each seed's folder; figures: the names written in --plot-dir."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING if args.quiet else logging.INFO)
    options.check_threads(args)
    torch.set_num_threads(args.threads)
    args.machine = measure.machine()
    log.info("machine: {cpu}, {cores} cores, {threads} threads, PyTorch {pytorch}".format(**args.machine))
    options.check_labels("--thresholds", args.thresholds)
    options.check_model(args)
    options.check_memory(args)
    if args.threads > (os.cpu_count() or 1):
        log.warning(f"--threads {args.threads}: this machine has {os.cpu_count()} cores; more threads than cores "
                    "make it slower, not faster")
    if args.bf16 and device(args).type == "cpu" and measure.native_bf16() is False:
        log.warning("--bf16: this CPU does not multiply bf16 natively (no AVX-512 BF16 or AMX); PyTorch converts "
                    "or emulates it, which may well be slower than fp32")
    if args.onnx:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError("--onnx needs the onnx and onnxscript packages: pip install -r requirements.txt") from None
    if getattr(args, "speed", False):
        from pruning import kernels
        if not kernels.available():
            raise UserError("--speed times the models through the sparse kernel, which needs llvmlite: "
                            "pip install -r requirements.txt")
    configs = [(checkpoints.training_config(args, seed), False) for seed in outputs.seeds(args)]
    if args.control:
        configs += [(checkpoints.training_config(args, seed, control=True), True) for seed in outputs.seeds(args)]
    paths = [(checkpoints.checkpoint_path(args, config, control), config) for config, control in configs]
    only_read = {path for path, config in paths if not checkpoints.needs_writing(path, config, args.retrain)}
    outputs.check_outputs(args, [path for path, _ in paths], model_files, figures, only_read)
    options.check_disk(args, model_files, args.seeds)
    log.info(f"models: {shown(args.save_dir)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")


def device(args):
    """Where the run trains and evaluates: CUDA unless --device cpu, where there is one."""
    return torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")


def setup(args):
    """Load the data and the trained model of this seed: (model, train, validation or None, test)."""
    on = device(args)
    root = data.data_root(args.data_dir)
    splits = [(x.to(on), y.to(on)) for x, y in data.load(root, args.validation)]
    train_data, test_data = splits[0], splits[-1]
    validation = splits[1] if args.validation else None
    log.info(f"data: {root} ({len(train_data[1]):,} training, {args.validation:,} validation, "
             f"{len(test_data[1]):,} test images); device: {on}; threads: {args.threads}; seed: {args.seed}")
    model = checkpoints.trained_model(args, train_data, test_data, train)
    args.data_folder = str(root.resolve())
    args.checkpoint_file = str(checkpoints.checkpoint_path(args, checkpoints.training_config(args)).resolve())
    if args.seeds > 1:
        folder = outputs.seed_folder(args, args.seed)
        if files.kind_of(folder) == "absent":
            folder.mkdir()
            outputs.made_folders.append(folder)
    return model, train_data, validation, test_data


def scores(model, validation, test_data, key="accuracy"):
    """{key: test accuracy}, with validation_<key> beside it when images are held out."""
    row = {key: training.accuracy(model, test_data)}
    if validation is not None:
        row[f"validation_{key}"] = training.accuracy(model, validation)
    return row


def over_seeds(args, run_one):
    """run_one() for each seed from args.seed on: (rows, per-seed rows, dense accuracies, control
    accuracies). With several seeds each row holds the mean of every number that varies and
    <key>_std beside it, and "varies" for a value that is not a number and differs."""
    first = args.seed
    runs = []
    for seed in outputs.seeds(args):
        args.seed = seed
        runs.append(run_one())
    args.seed = first
    per_seed = [rows for rows, _ in runs]
    dense = [d for _, d in runs]
    rows = per_seed[0] if args.seeds == 1 else [results.mean_row(rows) for rows in zip(*per_seed)]
    return rows, per_seed, dense


def results_over_seeds(args, run_one, plot):
    """Run over the seeds, write the JSON and the figures (before anything is printed, so that a
    closed stdout cannot lose them) and return (rows, dense: mean of each dense figure)."""
    rows, per_seed, dense = over_seeds(args, run_one)
    summary = results.mean_row(dense) if len(dense) > 1 else dense[0]
    if args.json:
        extra = {k.replace("validation_accuracy", "validation_dense_accuracy"): v for k, v in summary.items()
                 if k not in ("accuracy", "accuracy_std")}  # written as dense_accuracy(_std)
        results.write_json(args.json, options.settings(args), rows, [d["accuracy"] for d in dense], per_seed, extra)
    if args.plot:
        plot(rows, summary["accuracy"])
    return rows, summary


def name_of(model):
    """The network as figure titles name it: LeNet-5, or the MLP by its widths."""
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return "LeNet-5"
    return f"MLP {'-'.join(map(str, models.widths(model)))}"


def dense_results(args, model, train_data, validation, test_data):
    """The dense model's accuracies, and with --control those of the dense model trained as long as a pruned one."""
    out = scores(model, validation, test_data)
    if args.control:
        control = checkpoints.trained_model(args, train_data, test_data, train, control=True)
        out.update(scores(control, validation, test_data, "control_accuracy"))
        out["control_epochs"] = args.epochs + checkpoints.fine_tuning_epochs(args)
    return out


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


def progress(iterable, desc, unit):
    """A tqdm bar on a terminal; elsewhere (a pipe, a log file) one line per item done;
    nothing with --quiet."""
    if not log.isEnabledFor(logging.INFO):
        return iterable
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, leave=False, unit=unit)
    return progress_lines(list(iterable), desc, unit)


def progress_lines(items, desc, unit):
    start = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        log.info(f"{desc}: {unit} {i}/{len(items)} done ({time.perf_counter() - start:.1f} s)")


def run(main):
    """Run main(); a user error, Ctrl-C or SIGTERM ends it with one line on stderr, never a traceback,
    and a closed stdout (a pipe into head) ends it quietly, its other files written."""
    name = Path(sys.argv[0]).name
    signal.signal(signal.SIGINT, startup.interrupt)
    signal.signal(signal.SIGTERM, startup.interrupt)
    try:
        main()
        sys.stdout.flush()
    except (UserError, data.DataError) as e:
        startup.ignore_signals()
        print(f"{name}: error: {shown(e, 1000)}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, startup.Terminated) as e:
        startup.ignore_signals()
        print(f"{name}: interrupted; saved files are left as they were or complete", file=sys.stderr)
        sys.exit(128 + (signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM))
    except BrokenPipeError:
        startup.ignore_signals()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(128 + signal.SIGPIPE)
    finally:
        outputs.remove_empty_folders()


# Measured in a sweep ------------------------------------------------------------------------

BUSY = 0.1  # share of the CPU used by other processes from which timings are said to be unreliable


def timed(args, dense, pruned, x):
    """{pruned's and dense's seconds on the batch x}, the two timed in turn (measure.in_turn),
    with --speed the speed-ups of pruning.for_inference(pruned) over dense at batch 1, 32 and
    10,000 and the multiply-add ratio beside them. The load is read before and after; a busy
    machine is remembered in args.busy, and said under the table."""
    args.busy = getattr(args, "busy", False) or busy()
    with models.evaluating([dense, pruned]), torch.no_grad():
        t_dense, t_pruned = measure.in_turn([dense, pruned], x)
    row = {"inference_time_s": t_pruned, "dense_inference_time_s": t_dense}
    if args.speed:
        row["speedup"] = inference.speedups(dense, pruned, x.cpu())
        row["flops_ratio"] = measure.flops(dense, x) / max(1, measure.flops(pruned, x))
    args.busy = args.busy or busy()
    return row


def busy():
    share = measure.cpu_used_by_others(0.2)
    return share is not None and share > BUSY


def speed_columns(args):
    """The --speed columns: for_inference's speed-ups at each batch size, and the arithmetic's."""
    def speedups(by_batch):
        return " / ".join(f"{by_batch[str(b)]:.1f}" for b in inference.BATCHES) + "x"
    return [("Speed-up (batch 1 / 32 / 10,000)", "speedup", speedups),
            ("Fewer Multiply-adds", "flops_ratio", "{:.1f}x".format)] if args.speed else []


def speed_note(args, rows):
    """The lines under a table that say how its times were taken."""
    dense = statistics.mean(r["dense_inference_time_s"] for r in rows)
    line = (f"Times: the 10,000 test images in one batch, each row the median of {measure.ROUNDS} rounds taken in "
            f"turn with the dense model ({dense:.4f} s), {args.threads} threads, {args.machine['cpu']}.")
    if args.speed:
        line += ("\nSpeed-up: pruning.for_inference(model, batch) against the dense model in PyTorch, timed in turn at "
                 "each batch size; Fewer Multiply-adds: the dense model's over the pruned one's.")
    if getattr(args, "busy", False):
        line += "\nWarning: other processes used the CPU while these times were taken; rerun on an idle machine."
    return line

def compress(model, train_data, validation, test_data, args, teacher, path, name, dense_bytes):
    """Quantize a pruned model to args.bits, fine-tune its shared values when args.finetune_epochs,
    and save it to path: the row's accuracies (the file holds the last model measured), file size,
    and how many times smaller it is than the dense file of dense_bytes."""
    from pruning import compressed
    quantized = compressed.quantize(model, args.bits)
    row = scores(quantized, validation, test_data, "quantized_accuracy")
    if args.finetune_epochs:
        finetune(quantized, train_data, args, args.finetune_epochs, teacher, f"fine-tuning shared values at {name}")
        compressed.to_file_precision(quantized)
        row.update(scores(quantized, validation, test_data, "quantized_finetuned_accuracy"))
    row["compressed_bytes"] = outputs.save_model(quantized, path, "compressed")
    row["times_smaller"] = dense_bytes / row["compressed_bytes"]
    return row


def calibration_images(train_data, args):
    """--calibration training images, drawn at random (seeded by --seed): what one-shot pruning
    measures on. The validation images are not among them: they are held out of train_data."""
    x = train_data[0]
    generator = torch.Generator().manual_seed(args.seed)
    return x[torch.randperm(len(x), generator=generator)[:args.calibration].to(x.device)]


def zero_baselines(model, sparsity, validation, test_data, seed):
    """--baselines for a row of zero pruning: the accuracy of model with the same fraction of zeros
    chosen at random, and by magnitude in each layer alike; neither fine-tuned."""
    from pruning import baselines
    return {**scores(baselines.random_zeros(copy.deepcopy(model), sparsity, seed), validation, test_data,
                     "random_accuracy"),
            **scores(baselines.layerwise_zeros(copy.deepcopy(model), sparsity), validation, test_data,
                     "layerwise_accuracy")}


def unit_baselines(model, pruned, x, args, validation, test_data):
    """--baselines for a row of activation pruning: the accuracy of model cut to pruned's widths
    (its input pixels too with --prune-inputs), the units chosen at random, and each layer's by
    the norm of their weights; neither fine-tuned. x: the images the cut measures on."""
    from pruning import baselines, chain, methods, surgery
    widths = list(models.widths(pruned))
    spatial = surgery.spatial(chain.layers(model), x[:1])
    cut = [methods.shrink(model, widths, x, criterion, args.prune_inputs, spatial)
           for criterion in (baselines.random_units(args.seed), baselines.weight_norm_units)]
    return {**scores(cut[0], validation, test_data, "random_accuracy"),
            **scores(cut[1], validation, test_data, "layerwise_accuracy")}


def baseline_note(args):
    if not args.baselines:
        return None
    return ("Random and Layer-wise (--baselines), not fine-tuned: " + (
        "the same widths, the units chosen at random, and each layer's by the norm of their weights."
        if "activation" in Path(sys.argv[0]).name else
        "the same share of zeros, chosen at random, and by magnitude in each layer alike."))


def baseline_columns(rows):
    percent = "{:.2f}%".format
    return [("Random", "random_accuracy", percent), ("Layer-wise", "layerwise_accuracy", percent)] \
        if "random_accuracy" in rows[0] else []


def compressed_columns(finetuned):
    percent = "{:.2f}%".format
    return [("Quantized", "quantized_accuracy", percent),
            *([("Q. Fine-tuned", "quantized_finetuned_accuracy", percent)] if finetuned else []),
            ("Compressed File (B)", "compressed_bytes", "{:,.0f}".format),
            ("x Smaller", "times_smaller", "{:.1f}".format)]


def compressed_note(bits):
    return (f"Compressed: {bits}-bit shared weight values per layer, positions and codes LZMA-coded "
            "(pruning/compressed.py); the file holds the model of the last accuracy column before it; "
            "x Smaller is the dense file's size over it.")
