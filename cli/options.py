"""The options both pruning scripts share, each checked as it is parsed (a range, a choice), and
the checks that take several options together."""

import argparse
import math
import os
import shutil

import torch

from cli import checkpoints
from cli.results import label
from pruning import model as models
from pruning import training
from pruning.files import UserError, shown

FINAL_EPOCHS_FACTOR = 5
MAX_EPOCHS, MAX_BATCH, MAX_WIDTH, MAX_SEEDS, MAX_STEPS, MAX_THREADS = 1000, 60_000, 100_000, 100, 1000, 1024
MAX_LR, MAX_TEMPERATURE, MAX_THRESHOLD, MAX_SEED = 10.0, 100.0, 1e6, 2 ** 32 - MAX_SEEDS - 1
MAX_SHIFT = 14  # pixels: half an image
MODELS = {"mlp": "the MLP of --hidden", "lenet5": "LeNet-5 (Caffe): conv 20, conv 50, 800-500-10"}

MAX_VALUES = 100  # rows of one run, each with its model files


def check_labels(option, values):
    """Every row must print, and save, under its own label; a run has at most MAX_VALUES rows."""
    if len(values) > MAX_VALUES:
        raise UserError(f"{option}: {len(values):,} values; give at most {MAX_VALUES}")
    seen = {}
    for value in values:
        if label(value) in seen:
            same = "are the same" if seen[label(value)] == value else f"both print as {label(value)}"
            raise UserError(f"{option}: {seen[label(value)]:g} and {value:g} {same}; give distinct values")
        seen[label(value)] = value


def number_in(kind, low, high, open_low=False, open_high=False):
    """An argparse type: a `kind` (int or float) from low to high, an open end excluded."""
    show = "{:,}".format if kind is int else "{:g}".format

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if math.isnan(value):
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}")
        if not (value > low if open_low else value >= low):
            raise argparse.ArgumentTypeError(f"must be {'>' if open_low else '>='} {show(low)}, not {text}")
        if not (value < high if open_high else value <= high):
            raise argparse.ArgumentTypeError(f"must be {'<' if open_high else 'at most'} {show(high)}, not {text}")
        return value
    return parse


def positive(kind, limit):
    """A number > 0 and at most `limit`, the most the code can honour or that makes sense."""
    return number_in(kind, 0, limit, open_low=True)


ZERO_THRESHOLDS = [0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.10]  # zero_pruning.py's default sweep (bench.py's too)


GROUPS = {  # --help shows the options in these groups, in this order; each script adds its own to them
    "prune": "what to prune, and how much",
    "train": "training, steps and fine-tuning",
    "methods": "the frontier's methods",
    "outputs": "outputs: files, JSON, figures, ONNX",
    "runs": "data, seeds, speed and reproducibility",
}


class Options(argparse.Namespace):
    """The options as parsed: completed by the script's checks, then read-only once the run starts
    (freeze); what the run learns goes in a run.Run."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"the options are read-only once the run starts (setting {name})")
        super().__setattr__(name, value)


class Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        return super().parse_args(args, Options() if namespace is None else namespace)


def freeze(args):
    object.__setattr__(args, "_frozen", True)
    return args


def with_seed(args, seed):
    """A read-only copy of args for one seed of a run over several."""
    return freeze(Options(**{**settings(args, everything=True), "seed": seed}))


def parser(description, thresholds):
    """The options both scripts share, in GROUPS (p.groups[name] to add to one)."""
    p = Parser(description=description)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")
    p.groups = {name: p.add_argument_group(title) for name, title in GROUPS.items()}
    prune, train, _, outputs, runs = p.groups.values()
    prune.add_argument("--thresholds", type=number_in(float, 0, MAX_THRESHOLD), nargs="+", default=thresholds,
                       metavar="T",
                   help=f"thresholds to sweep, each a finite number >= 0 (default: {' '.join(map(str, thresholds))})")
    prune.add_argument("--model", default="mlp", metavar="{" + ",".join(MODELS) + ",FILE}",
                   help="the network: " + "; ".join(f"{k}, {v}" for k, v in MODELS.items())
                   + "; or FILE, a trained network in a torch.export file (.pt2) or a model file of this project, "
                     "pruned as it is, no training (default: mlp)")
    runs.add_argument("--data-dir", metavar="DIR",
                   help="folder holding MNIST/raw/ (default: $MNIST_DATA_DIR, else ./data)")
    train.add_argument("--checkpoint", metavar="PATH", help="trained model file, retrained when it does not fit the "
                   "training settings (default: checkpoints/<model>-<hash of the training settings>.pt)")
    train.add_argument("--retrain", action="store_true", help="train the model even if its checkpoint fits")
    prune.add_argument("--hidden", type=positive(int, MAX_WIDTH), nargs="+", default=list(models.MLP_SIZES[1:-1]),
                   metavar="H", help=f"hidden widths of the MLP; 300 100 is LeNet-300-100 "
                                     f"(default: {' '.join(map(str, models.MLP_SIZES[1:-1]))})")
    train.add_argument("--epochs", type=positive(int, MAX_EPOCHS), default=5, metavar="N",
                   help="training epochs (default: 5)")
    train.add_argument("--lr", type=positive(float, MAX_LR), default=1e-3,
                   help="Adam learning rate, cosine-decayed to 0 (default: 0.001)")
    train.add_argument("--batch-size", type=positive(int, MAX_BATCH), default=128, metavar="N",
                   help="batch size (default: 128)")
    runs.add_argument("--seed", type=number_in(int, 0, MAX_SEED), default=0,
                   help="seed of initialisation and shuffling (default: 0)")
    runs.add_argument("--seeds", type=positive(int, MAX_SEEDS), default=1, metavar="N",
                   help="repeat the whole run with seeds --seed, --seed + 1, ...: the table shows each figure's "
                        "mean and standard deviation over them (default: 1)")
    runs.add_argument("--validation", type=number_in(int, 0, 50_000), default=0, metavar="N",
                   help="hold out the last N training images: the model never trains on them, and every row "
                        "gains its accuracy on them (default: 0, none held out)")
    train.add_argument("--control", action="store_true",
                   help="also train the dense model for as many epochs as a pruned model got in all "
                        "(training and fine-tuning) and report its accuracy: the cost of pruning at equal training")
    train.add_argument("--finetune-epochs", type=positive(int, MAX_EPOCHS), metavar="N",
                   help="fine-tune each pruned model for N epochs (default: none, one-shot pruning only; with "
                        "--steps, 4 a step in zero pruning, 6 in activation pruning)")
    train.add_argument("--finetune-lr", type=positive(float, MAX_LR), default=1e-3, metavar="LR",
                   help="fine-tuning learning rate, cosine-decayed to 0 (default: 0.001)")
    train.add_argument("--input-dropout", type=number_in(float, 0, 1, open_high=True), metavar="P",
                   help="in every training after the dense model's (fine-tuning, --group-lasso, "
                        "--variational-dropout), drop each input pixel at random with probability P, the teacher "
                        "seeing whole images (default: 0; 0.1 in activation pruning with --prune-inputs in --steps "
                        "without --finetune-epochs)")
    train.add_argument("--steps", type=positive(int, MAX_STEPS), default=1, metavar="K",
                   help="reach each target in K steps on a cubic schedule, fine-tuning after each (default: 1)")
    train.add_argument("--final-epochs", type=positive(int, MAX_EPOCHS), metavar="N",
                   help=f"fine-tuning epochs after the last of several --steps (default: {FINAL_EPOCHS_FACTOR} times "
                        "--finetune-epochs; 30 in zero pruning when --finetune-epochs is not given)")
    train.add_argument("--distill", action="store_true",
                   help="fine-tune against the dense model's softened outputs as well as the labels")
    train.add_argument("--temperature", type=positive(float, MAX_TEMPERATURE), default=4.0, metavar="T",
                   help="softening temperature of --distill (default: 4)")
    train.add_argument("--distill-weight", type=number_in(float, 0, 1), default=0.5, metavar="W",
                   help="weight of the dense model's outputs in the --distill loss, the labels' is 1 - W "
                        "(default: 0.5)")
    outputs.add_argument("--bits", type=number_in(int, 2, 8), metavar="B",
                   help="also store each pruned model compressed, B from 2 to 8: each layer's weights shared among "
                        "2^B values (k-means; fine-tuned too with --finetune-epochs), positions and codes LZMA-coded")
    outputs.add_argument("--onnx", action="store_true",
                         help="also write each pruned model as ONNX beside its other files")
    train.add_argument("--bf16", action="store_true",
                   help="train and fine-tune with bf16 matrix products, the logits' layer in fp32: faster on CPUs "
                        "that multiply bf16 natively (AVX-512 BF16, AMX), as accurate within the spread over seeds")
    train.add_argument("--shift", type=number_in(int, 0, MAX_SHIFT), default=0, metavar="K",
                   help="train, fine-tune and distil on images each moved at random by up to K pixels across and "
                        "down (the dense model and the control too; data augmentation, which the published "
                        "LeNet results did not use; default: 0, the images as they are)")
    runs.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train and evaluate; auto picks CUDA when present (default: auto)")
    runs.add_argument("--baselines", action="store_true",
                   help="set each row beside random pruning and layer-wise magnitude at the same sparsity (zero "
                        "pruning) or random units and units by weight norm at the same widths (activation pruning), "
                        "neither fine-tuned")
    runs.add_argument("--speed", action="store_true",
                   help="time each pruned model through pruning.for_inference against the dense model at batch 1, "
                        "32 and 10,000, in turn, and show the speed-ups beside how much less arithmetic it does")
    runs.add_argument("--threads", type=positive(int, MAX_THREADS), default=torch.get_num_threads(), metavar="N",
                   help=f"CPU threads (default: {torch.get_num_threads()}, this machine's)")
    outputs.add_argument("--save-dir", metavar="DIR",
                         help="folder for the models, made if absent and its parent exists "
                   "(default: a new folder runs/<script>-<date>-<time>/ of the project's for each run)")
    outputs.add_argument("--json", metavar="PATH", help="also write the settings and results as JSON to PATH")
    outputs.add_argument("--plot", action="store_true", help="draw this script's figures as PNG files in --plot-dir")
    outputs.add_argument("--plot-dir", metavar="DIR", help="folder for the figures, made if absent; implies --plot "
                   "(default: figures/, which git ignores; the README's are in docs/images/)")
    outputs.add_argument("--quiet", action="store_true", help="print only the results: no progress, no log")
    return p


def steps_on_defaults(args):
    """--steps without --finetune-epochs: fine-tuning takes each script's step defaults, and the
    scripts add their frontier recipe. Ask before check_steps, which fills --finetune-epochs in."""
    return args.steps > 1 and not args.finetune_epochs


def check_steps(args, target_option, step_epochs, final_epochs=None):
    """--steps needs a target. Without --finetune-epochs, steps fine-tune step_epochs each and
    final_epochs (default: FINAL_EPOCHS_FACTOR times step_epochs) after the last; with it, the last
    gets FINAL_EPOCHS_FACTOR times --finetune-epochs. --final-epochs overrides either, and with a
    single step it is --finetune-epochs itself."""
    if args.steps > 1 and not getattr(args, target_option.strip("-")):
        raise UserError(f"--steps takes {target_option}")
    if args.final_epochs and args.steps == 1:
        raise UserError("--final-epochs takes --steps 2 or more")
    if args.steps == 1:
        args.final_epochs = args.finetune_epochs
    elif steps_on_defaults(args):
        args.finetune_epochs, args.final_epochs = step_epochs, args.final_epochs or final_epochs
    args.final_epochs = args.final_epochs or FINAL_EPOCHS_FACTOR * (args.finetune_epochs or 0)


def check_model(args):
    if args.model not in MODELS:
        given = checkpoints.given_model(args.model)  # the file, read and checked first
        if args.hidden != list(models.MLP_SIZES[1:-1]):
            raise UserError("--hidden sets the MLP's widths; a --model FILE's are its own")
        for option in ("control", "retrain", "checkpoint"):
            if getattr(args, option, None):
                raise UserError(f"--{option} is about training the dense model; --model FILE is trained already")
        params = models.count_params(given)
        if params > models.MAX_PARAMS:
            raise UserError(f"--model {shown(args.model)}: a model of {params:,} parameters; the scripts prune at "
                            f"most {models.MAX_PARAMS:,}")
        return
    if args.model == "lenet5":
        if args.hidden != list(models.MLP_SIZES[1:-1]):
            raise UserError("--hidden sets the MLP's widths; LeNet-5's are fixed (give --model mlp)")
        return
    params, _ = planned_size(args)
    if params > models.MAX_PARAMS:
        raise UserError(f"--hidden {' '.join(map(str, args.hidden))}: a model of {params:,} parameters; this "
                        f"project builds at most {models.MAX_PARAMS:,}")


LENET5_UNITS = 20 * 24 * 24 + 20 * 12 * 12 + 50 * 8 * 8 + 50 * 4 * 4 + 500 + 10  # activations of one image
DATA_BYTES = 2 * 70_000 * 785 * 4  # MNIST as fp32 tensors, and a copy while it is split


def check_threads(args):
    cores = os.cpu_count() or 1
    if args.threads > 4 * cores:
        raise UserError(f"--threads {args.threads}: this machine has {cores} cores; give at most {4 * cores}")


def planned_size(args):
    """(parameters, units) of the model the options ask for: its weights, and the activations one
    image makes in it."""
    if args.model not in MODELS:
        return models.count_params(checkpoints.given_model(args.model)), checkpoints.given_units(args.model)
    if args.model == "lenet5":
        return models.count_params(models.lenet5()), LENET5_UNITS
    sizes = checkpoints.sizes(args)
    return models.mlp_params(sizes), sum(sizes)


def check_memory(args):
    """Refuse, before any training, a model and batch that this machine's memory cannot hold: the
    weights with their gradients, Adam's moments, a teacher and copies, and a batch's activations
    kept for the backward pass, with the data."""
    params, units = planned_size(args)
    need = 4 * (8 * params + 4 * units * max(args.batch_size, training.EVAL_BATCH)) + DATA_BYTES
    have = available_memory()
    if have is not None and need > have:
        raise UserError(f"the model and --batch-size {args.batch_size} need about {need / 2**30:.1f} GiB of memory "
                        f"to train; this machine has {have / 2**30:.1f} GiB available (give a smaller model or batch)")


def check_disk(args, model_files, seeds):
    """Refuse a run whose model files would fill the disk they go to, before any training."""
    params, _ = planned_size(args)
    need = len(model_files) * seeds * (4 * params + (64 << 10))
    free = shutil.disk_usage(args.save_dir).free
    if need > free:
        raise UserError(f"the {len(model_files) * seeds:,} model files of this run may take up to "
                        f"{need / 2**20:,.0f} MiB; {shown(args.save_dir)} has {free / 2**20:,.0f} MiB free "
                        "(give fewer thresholds or sparsities, or another --save-dir)")


def available_memory():
    """Bytes of memory available to a new allocation (Linux: MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def settings(args, everything=False):
    """The options as the JSON gives them (everything: those that say where output goes too)."""
    hidden = ("_frozen",) if everything else ("_frozen", "json", "plot", "quiet")
    return {k: v for k, v in vars(args).items() if k not in hidden}
