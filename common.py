"""What both pruning scripts share: the MNIST MLP, its data, training, evaluation,
measurement, results tables and the command line around them."""

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import files
import startup
import mnist
from files import UserError

SIZES = (784, 512, 256, 128, 10)
FINAL_EPOCHS_FACTOR = 5
MAX_EPOCHS, MAX_BATCH, MAX_WIDTH, MAX_SEEDS, MAX_STEPS, MAX_THREADS = 1000, 60_000, 100_000, 100, 1000, 1024
MAX_LR, MAX_TEMPERATURE, MAX_THRESHOLD, MAX_SEED = 10.0, 100.0, 1e6, 2 ** 32 - MAX_SEEDS - 1
TRAINING_RECIPE = "fused adam, cosine learning rate, cross-entropy"

log = logging.getLogger("pruning")
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")


# The model ----------------------------------------------------------------------------

def mlp(sizes=SIZES, inputs=None):
    """Fully connected ReLU network: sizes[0] inputs, sizes[-1] logits. With `inputs`, the indices
    of sizes[0] pixels, it takes whole images and reads only those pixels."""
    layers = [KeepInputs(inputs)] if inputs is not None else []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class KeepInputs(nn.Module):
    """The first module of a model whose input pixels were pruned: it keeps the pixels it indexes."""

    def __init__(self, indices):
        super().__init__()
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long))

    def forward(self, x):
        return x.index_select(1, self.indices)


def kept_inputs(model):
    """The indices of the input pixels the model reads: all of them unless it starts with KeepInputs."""
    if isinstance(model[0], KeepInputs):
        return model[0].indices
    return torch.arange(linears(model)[0].in_features, device=linears(model)[0].weight.device)


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def widths(model):
    """Input size followed by every layer's output size, e.g. (784, 512, 256, 128, 10)."""
    layers = linears(model)
    return (layers[0].in_features, *(layer.out_features for layer in layers))


def count_weights(model):
    return sum(layer.weight.numel() for layer in linears(model))


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# Training and evaluation --------------------------------------------------------------

def distillation_loss(logits, labels, teacher_logits=None, temperature=4.0, weight=0.5):
    """Cross-entropy with the labels, mixed with weight of the KL divergence from the teacher's
    outputs softened by the temperature (Hinton et al. 2015); scaled by T^2 so that its gradients
    keep their size whatever the temperature. With no teacher or weight 0: plain cross-entropy."""
    hard = F.cross_entropy(logits, labels)
    if teacher_logits is None or weight == 0:
        return hard
    soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature ** 2 * soft


def train(model, data, epochs, lr, batch_size, seed, desc="training", teacher=None):
    """Adam (fused) with a cosine-decayed learning rate, reshuffling every epoch from a seeded generator.
    teacher: None, or (its logits for every training example, temperature, weight) to distil from."""
    x, y = data
    teacher_logits, temperature, weight = teacher or (None, None, 0)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)  # one kernel per step: 13% faster training
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(x) / batch_size))
    for _ in progress(range(epochs), desc, "epoch"):
        for idx in torch.randperm(len(x), generator=gen).to(x.device).split(batch_size):
            soft_targets = None if teacher_logits is None else teacher_logits[idx]
            loss = distillation_loss(model(x[idx]), y[idx], soft_targets, temperature, weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"{desc} diverged: the weights are no longer finite numbers; lower the learning rate")
    return model


def finetune(model, train_data, args, epochs, teacher_logits=None, desc="fine-tuning"):
    """Fine-tune with the --finetune-* settings; from the teacher's logits as well when --distill."""
    teacher = (teacher_logits, args.temperature, args.distill_weight) if args.distill else None
    return train(model, train_data, epochs, args.finetune_lr, args.batch_size, args.seed, desc, teacher)


def step_finetuner(train_data, args, teacher_logits, label):
    """finetune(model, step) for pruning in args.steps steps: --finetune-epochs after each step,
    --final-epochs after the last."""
    def finetune_step(model, step):
        epochs = args.final_epochs if step == args.steps else args.finetune_epochs
        finetune(model, train_data, args, epochs, teacher_logits,
                 f"fine-tuning at {label}" + (f", step {step}/{args.steps}" if args.steps > 1 else ""))
    return finetune_step


def check_steps(args, target_option):
    """--steps needs a target and fine-tuning; --final-epochs defaults to FINAL_EPOCHS_FACTOR times
    --finetune-epochs, and is --finetune-epochs itself with a single step."""
    if args.steps > 1 and not (getattr(args, target_option.strip("-")) and args.finetune_epochs):
        raise UserError(f"--steps takes {target_option} and --finetune-epochs")
    if args.final_epochs and args.steps == 1:
        raise UserError("--final-epochs takes --steps 2 or more")
    if args.steps == 1:
        args.final_epochs = args.finetune_epochs
    args.final_epochs = args.final_epochs or FINAL_EPOCHS_FACTOR * (args.finetune_epochs or 0)


@torch.no_grad()
def logits(model, x, batch_size=10000):
    return torch.cat([model(xb) for xb in x.split(batch_size)])


def predict(model, x):
    return logits(model, x).argmax(1)


def accuracy(model, data):
    """Percentage of correctly classified examples."""
    x, y = data
    return 100 * (predict(model, x) == y).double().mean().item()


@torch.no_grad()
def inference_time(fn, x, threads, min_run_time=0.5):
    """Median seconds of fn(x), after warm-up, with a fixed thread count (torch.utils.benchmark)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # a CUDA notice on import
    from torch.utils.benchmark import Timer
    timer = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


# Pruning schedules --------------------------------------------------------------------

def cubic_schedule(target, steps):
    """The fraction pruned after each of `steps` steps toward `target`, s_k = S (1 - (1 - k/K)^3)
    (Zhu and Gupta 2017): large steps while the network has much to spare, small ones at the end."""
    return [target * (1 - (1 - k / steps) ** 3) for k in range(1, steps + 1)]


# Results ------------------------------------------------------------------------------

def write_json(path, settings, rows, dense_accuracies, per_seed):
    """settings, the dense model's accuracy, one object per table row, and with several seeds
    each seed's rows."""
    results = {"settings": settings, "dense_accuracy": statistics.mean(dense_accuracies)}
    if len(per_seed) > 1:
        results["dense_accuracy_std"] = statistics.stdev(dense_accuracies)
    results["rows"] = rows
    if len(per_seed) > 1:
        results["per_seed"] = per_seed
        results["per_seed_dense_accuracy"] = dense_accuracies
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    files.atomic_write(path, lambda f: f.write(text.encode()))


# The trained model, cached ------------------------------------------------------------

def sizes(args):
    return [SIZES[0], *args.hidden, SIZES[-1]]


def training_config(args):
    return {"sizes": sizes(args), "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "seed": args.seed, "recipe": TRAINING_RECIPE}


def checkpoint_path(args, config):
    """--checkpoint (one per seed, PATH-seedN, with several seeds), else one named by the settings."""
    if args.checkpoint:
        path = Path(args.checkpoint)
        return path.with_stem(f"{path.stem}-seed{args.seed}") if args.seeds > 1 else path
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return Path(__file__).parent / "checkpoints" / f"mlp-{key}.pt"


def load_checkpoint(path, config):
    """The model stored at `path`, or None with a one-line reason why it cannot be used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        return None, f"unreadable ({type(e).__name__})"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return None, "not a checkpoint of this project"
    if ckpt.get("config") != config:
        return None, "made with other settings"
    model = mlp(config["sizes"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError):
        return None, "weights do not fit the architecture"
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return None, "holding weights that are not finite numbers"
    return model, None


def trained_model(args, train_data, test_data):
    """The MLP trained with the settings in args: from its checkpoint when one fits, else trained and saved."""
    config = training_config(args)
    path = checkpoint_path(args, config)
    if path.exists() and not args.retrain:
        model, problem = load_checkpoint(path, config)
        if model:
            model.to(train_data[0].device)
            log.info(f"model: loaded {path} (test accuracy {accuracy(model, test_data):.2f}%)")
            return model
        log.warning(f"model: checkpoint {path} is {problem}; retraining")
    torch.manual_seed(args.seed)
    model = mlp(config["sizes"]).to(train_data[0].device)
    start = time.perf_counter()
    train(model, train_data, args.epochs, args.lr, args.batch_size, args.seed)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    files.save_torch({"config": config, "state_dict": state}, path)
    log.info(f"model: trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s, saved to {path} "
             f"(test accuracy {accuracy(model, test_data):.2f}%)")
    return model


# The command line ---------------------------------------------------------------------

def label(value):
    """How a threshold or fraction is printed in the table."""
    return f"{value:.4g}"


def check_labels(option, values):
    """Every row must print, and save, under its own label."""
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


def parser(description, thresholds):
    p = argparse.ArgumentParser(description=description)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")
    p.add_argument("--thresholds", type=number_in(float, 0, MAX_THRESHOLD), nargs="+", default=thresholds, metavar="T",
                   help=f"thresholds to sweep, each a finite number >= 0 (default: {' '.join(map(str, thresholds))})")
    p.add_argument("--data-dir", metavar="DIR", help="folder holding MNIST/raw/ (default: $MNIST_DATA_DIR, else ./data)")
    p.add_argument("--checkpoint", metavar="PATH", help="trained model file, retrained when it does not fit the "
                   "training settings (default: checkpoints/mlp-<hash of the training settings>.pt)")
    p.add_argument("--retrain", action="store_true", help="train the model even if its checkpoint fits")
    p.add_argument("--hidden", type=positive(int, MAX_WIDTH), nargs="+", default=list(SIZES[1:-1]), metavar="H",
                   help=f"hidden widths of the MLP; 300 100 is LeNet-300-100 "
                        f"(default: {' '.join(map(str, SIZES[1:-1]))})")
    p.add_argument("--epochs", type=positive(int, MAX_EPOCHS), default=5, metavar="N", help="training epochs (default: 5)")
    p.add_argument("--lr", type=positive(float, MAX_LR), default=1e-3,
                   help="Adam learning rate, cosine-decayed to 0 (default: 0.001)")
    p.add_argument("--batch-size", type=positive(int, MAX_BATCH), default=128, metavar="N", help="batch size (default: 128)")
    p.add_argument("--seed", type=number_in(int, 0, MAX_SEED), default=0, help="seed of initialisation and shuffling (default: 0)")
    p.add_argument("--seeds", type=positive(int, MAX_SEEDS), default=1, metavar="N",
                   help="repeat the whole run with seeds --seed, --seed + 1, ...: the table shows each figure's "
                        "mean and standard deviation over them (default: 1)")
    p.add_argument("--finetune-epochs", type=positive(int, MAX_EPOCHS), metavar="N",
                   help="fine-tune each pruned model for N epochs (default: none, one-shot pruning only)")
    p.add_argument("--finetune-lr", type=positive(float, MAX_LR), default=1e-3, metavar="LR",
                   help="fine-tuning learning rate, cosine-decayed to 0 (default: 0.001)")
    p.add_argument("--steps", type=positive(int, MAX_STEPS), default=1, metavar="K",
                   help="reach each target in K steps on a cubic schedule, fine-tuning after each (default: 1)")
    p.add_argument("--final-epochs", type=positive(int, MAX_EPOCHS), metavar="N",
                   help=f"fine-tuning epochs after the last of several --steps (default: {FINAL_EPOCHS_FACTOR} times "
                        "--finetune-epochs)")
    p.add_argument("--distill", action="store_true",
                   help="fine-tune against the dense model's softened outputs as well as the labels")
    p.add_argument("--temperature", type=positive(float, MAX_TEMPERATURE), default=4.0, metavar="T",
                   help="softening temperature of --distill (default: 4)")
    p.add_argument("--distill-weight", type=number_in(float, 0, 1), default=0.5, metavar="W",
                   help="weight of the dense model's outputs in the --distill loss, the labels' is 1 - W "
                        "(default: 0.5)")
    p.add_argument("--bits", type=number_in(int, 2, 8), metavar="B",
                   help="also store each pruned model compressed: each layer's weights shared among 2^B values "
                        "(k-means; fine-tuned too with --finetune-epochs), positions and codes LZMA-coded")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train and evaluate; auto picks CUDA when present (default: auto)")
    p.add_argument("--threads", type=positive(int, MAX_THREADS), default=torch.get_num_threads(), metavar="N",
                   help=f"CPU threads (default: {torch.get_num_threads()}, this machine's)")
    p.add_argument("--save-dir", metavar="DIR", help="keep the pruned models as files in this existing folder")
    p.add_argument("--json", metavar="PATH", help="also write the settings and results as JSON to PATH")
    p.add_argument("--plot", action="store_true", help="draw this script's figures as PNG files in --plot-dir")
    p.add_argument("--plot-dir", metavar="DIR", help="folder for the figures, created if absent; implies --plot "
                   "(default: figures/, which git ignores; the README's are in images/)")
    p.add_argument("--quiet", action="store_true", help="print only the results: no progress, no log")
    return p


def setup(args):
    """Check the arguments, then load the data and the trained model: (model, train, test)."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING if args.quiet else logging.INFO)
    torch.set_num_threads(args.threads)
    args.machine = machine()
    log.info("machine: {cpu}, {cores} cores, {threads} threads, PyTorch {pytorch}".format(**args.machine))
    check_labels("--thresholds", args.thresholds)
    if args.threads > (os.cpu_count() or 1):
        log.warning(f"--threads {args.threads}: this machine has {os.cpu_count()} cores; more threads than cores "
                    "make it slower, not faster")
    checkpoint = checkpoint_path(args, training_config(args))
    if not args.checkpoint:  # the project's own folder, made on the first run
        checkpoint.parent.mkdir(exist_ok=True)
    files.check_distinct([("--checkpoint", checkpoint), ("--json", args.json)],
                         [("--save-dir", args.save_dir), ("--plot-dir", args.plot_dir)], checkpoint)
    if args.json:
        files.check_file_destination("--json", args.json)
    if args.save_dir:
        files.check_folder_destination("--save-dir", args.save_dir)
    if args.plot or args.plot_dir:
        args.plot, args.plot_dir = True, args.plot_dir or "figures"
        if files.kind_of(Path(args.plot_dir)) == "absent" and files.kind_of(Path(args.plot_dir).parent) == "folder":
            try:
                Path(args.plot_dir).mkdir()
            except OSError as e:
                raise UserError(f"cannot make the figures' folder {args.plot_dir}: {e.strerror}") from None
        files.check_folder_destination("--plot-dir", args.plot_dir)
    for seed in range(args.seed, args.seed + args.seeds):
        one = argparse.Namespace(**{**vars(args), "seed": seed})
        files.check_checkpoint_destination(checkpoint_path(one, training_config(one)))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    root = mnist.data_root(args.data_dir)
    train_data, test_data = [(x.to(device), y.to(device)) for x, y in mnist.load(root)]
    log.info(f"data: {root} ({len(train_data[1]):,} training, {len(test_data[1]):,} test images); "
             f"device: {device}; threads: {args.threads}; seed: {args.seed}")
    model = trained_model(args, train_data, test_data)
    args.data_folder = str(root.resolve())
    args.checkpoint_file = str(checkpoint.resolve())
    return model, train_data, test_data


def machine():
    """What the figures were measured on: another CPU rounds differently, and prints slightly different ones."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "pytorch": torch.__version__}


def over_seeds(args, run_one):
    """run_one() for each of args.seeds seeds from args.seed on: (rows, per-seed rows, dense
    accuracies). With several seeds each row holds the mean of every number that varies and
    <key>_std beside it, and "varies" for a value that is not a number and differs."""
    first = args.seed
    runs = []
    for seed in range(first, first + args.seeds):
        args.seed = seed
        runs.append(run_one())
    args.seed = first
    per_seed = [rows for rows, _ in runs]
    if args.seeds == 1:
        return per_seed[0], per_seed, [runs[0][1]]
    return [mean_row(rows) for rows in zip(*per_seed)], per_seed, [dense for _, dense in runs]


def results_over_seeds(args, run_one, plot):
    """Run over the seeds, write the JSON and the figures (before anything is printed, so that a
    closed stdout cannot lose them) and return (rows, mean dense accuracy)."""
    rows, per_seed, dense_accuracies = over_seeds(args, run_one)
    baseline = statistics.mean(dense_accuracies)
    if args.json:
        write_json(args.json, settings(args), rows, dense_accuracies, per_seed)
    if args.plot:
        plot(rows, baseline)
    return rows, baseline


VARIES = "varies"


def mean_row(rows):
    """One row from the same row of several runs: means and sample standard deviations (of lists
    of widths, element by element; other lists, such as the pixels kept, are sets, never averaged)."""
    out = {}
    for key, value in rows[0].items():
        values = [r[key] for r in rows]
        if all(v == value for v in values):
            out[key] = value
        elif all(isinstance(v, (int, float)) for v in values):
            out[key], out[f"{key}_std"] = statistics.mean(values), statistics.stdev(values)
        elif key.endswith("widths") and all(isinstance(v, list) and len(v) == len(value)
                                            and all(isinstance(x, (int, float)) for x in v) for v in values):
            out[key] = [statistics.mean(column) for column in zip(*values)]
            out[f"{key}_std"] = [statistics.stdev(column) for column in zip(*values)]
        else:
            out[key] = VARIES
    return out


def save_dir(args):
    """Where this seed's files go: --save-dir, or a folder seed-N in it when there are several seeds."""
    if not args.save_dir:
        return None
    if args.seeds == 1:
        return Path(args.save_dir)
    folder = Path(args.save_dir) / f"seed-{args.seed}"
    folder.mkdir(exist_ok=True)
    return folder


def settings(args):
    return {k: v for k, v in vars(args).items() if k not in ("json", "plot", "quiet")}


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


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def accuracy_figure(rows, baseline, removed_key, what, curves, published=()):
    """Two panels: accuracy against the share of `what` removed over the whole range, where a
    one-shot collapse shows, and zoomed on the recovered curves against the share kept on a log axis.
    curves: (row key, label) pairs, drawn where the rows hold them; published: (name, % kept, % error)."""
    plt = pyplot()
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4.2))
    removed = [r[removed_key] for r in rows]
    curves = [(key, label, f"{'os^vd'[i]}{'-' if i < 3 else '--'}C{i}") for i, (key, label) in enumerate(curves)
              if key in rows[0]]
    for key, label, style in curves:
        full.plot(removed, [r[key] for r in rows], style, label=label)
    full.axhline(baseline, color="gray", ls=":", label=f"unpruned model ({baseline:.2f}%)")
    full.set(xlabel=f"{what} removed (%)", ylabel="test accuracy (%)", title="The whole range")
    full.legend(fontsize=8)

    zoomed = curves[1:] or curves
    for key, label, style in zoomed:
        zoom.plot([100 - x for x in removed], [r[key] for r in rows], style, label=label)
    for i, (name, kept, error) in enumerate(published):
        zoom.plot(kept, 100 - error, "k*", ms=9)
        zoom.annotate(name, (kept, 100 - error), xytext=(5, -12 if i % 2 else 5), textcoords="offset points", fontsize=8)
    zoom.axhline(baseline, color="gray", ls=":", label=f"unpruned model ({baseline:.2f}%)")
    accuracies = [r[key] for r in rows for key, _, _ in zoomed] + [100 - e for _, _, e in published]
    zoom.set(xscale="log", xlabel=f"{what} kept (%, log scale)", ylabel="test accuracy (%)",
             ylim=(max(min(accuracies), baseline - 5) - 0.2, max(accuracies + [baseline]) + 0.3),
             title=f"Zoomed: {what} kept against accuracy")
    zoom.xaxis.set_major_formatter(plt.FuncFormatter("{:g}".format))
    zoom.xaxis.set_minor_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}" if f"{x:g}"[0] in "25" else ""))
    zoom.invert_xaxis()
    zoom.legend(fontsize=8)
    return fig


def save_figure(fig, folder, name):
    fig.tight_layout()
    files.atomic_write(Path(folder) / name, lambda f: fig.savefig(f, format="png", dpi=120))
    log.info(f"figure: {Path(folder) / name}")


def markdown_table(rows, columns):
    """columns: (header, key, format function) triples; rows: dicts holding those keys, and
    <key>_std for a mean over seeds, shown as 98.31 ± 0.06%."""
    def cell(row, key, fmt):
        if row[key] == VARIES:
            return VARIES
        text = fmt(row[key])
        if f"{key}_std" not in row:
            return text
        unit = "%" if text.endswith("%") else ""
        return f"{text.removesuffix(unit)} ± {fmt(row[f'{key}_std']).removesuffix(unit)}{unit}"

    cells = [[header for header, _, _ in columns]]
    cells += [[cell(row, key, fmt) for _, key, fmt in columns] for row in rows]
    width = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(line, width)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in width) + "|")
    return "\n".join(lines)


def run(main):
    """Run main(); a user error, Ctrl-C or SIGTERM ends it with one line on stderr, never a traceback,
    and a closed stdout (a pipe into head) ends it quietly, its other files written."""
    name = Path(sys.argv[0]).name
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, startup.raise_terminated)
    try:
        main()
        sys.stdout.flush()
    except (UserError, mnist.DataError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, startup.Terminated) as e:
        print(f"{name}: interrupted; saved files are left as they were or complete", file=sys.stderr)
        sys.exit(128 + (signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM))
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(128 + signal.SIGPIPE)
