"""A run of either pruning script, past its options: every argument and destination checked before
the work, the data and the trained model of each seed, the rows over seeds written as JSON and
figures, the table and its notes printed, and one-line errors. The options stay as parsed
(options.freeze); what the run learns as it goes is a Run's."""

import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from cli import checkpoints, options, outputs, recipe, results, startup, tables
from pruning import data, files, measure
from pruning.files import UserError, shown

log = logging.getLogger("pruning")


@dataclasses.dataclass
class Run:
    """What a run learns as it goes: the machine, the data and checkpoint it read, and whether the
    machine was busy while models were timed (None: nothing was timed)."""
    machine: dict
    data_folder: str | None = None
    checkpoint_file: str | None = None
    busy: bool | None = None

    def settings(self, args):
        """The options as parsed, and where the run read its data and model: the JSON's settings."""
        about = {"machine": self.machine, "data_folder": self.data_folder, "checkpoint_file": self.checkpoint_file}
        if self.busy is not None:
            about["busy"] = self.busy
        return {**options.settings(args), **about}


def prepare(args, model_files, figures):
    """Before any work: check the arguments and every destination of the run, then freeze args.
    model_files: the names written in each seed's folder; figures: the names written in --plot-dir."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING if args.quiet else logging.INFO)
    options.check_threads(args)
    torch.set_num_threads(args.threads)
    run = Run(machine=measure.machine())
    log.info("machine: {cpu}, {cores} cores, {threads} threads, PyTorch {pytorch}".format(**run.machine))
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
    options.freeze(args)
    return run


def device(args):
    """Where the run trains and evaluates: CUDA unless --device cpu, where there is one."""
    return torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")


def setup(args, run):
    """Load the data and the trained model of args.seed: (model, train, validation or None, test)."""
    on = device(args)
    root = data.data_root(args.data_dir)
    splits = [(x.to(on), y.to(on)) for x, y in data.load(root, args.validation)]
    train_data, test_data = splits[0], splits[-1]
    validation = splits[1] if args.validation else None
    log.info(f"data: {root} ({len(train_data[1]):,} training, {args.validation:,} validation, "
             f"{len(test_data[1]):,} test images); device: {on}; threads: {args.threads}; seed: {args.seed}")
    model = checkpoints.trained_model(args, train_data, test_data, recipe.train)
    run.data_folder = str(root.resolve())
    run.checkpoint_file = str(checkpoints.checkpoint_path(args, checkpoints.training_config(args)).resolve())
    if args.seeds > 1:
        folder = outputs.seed_folder(args, args.seed)
        if files.kind_of(folder) == "absent":
            folder.mkdir()
            outputs.made_folders.append(folder)
    return model, train_data, validation, test_data


def dense_results(args, model, train_data, validation, test_data):
    """The dense model's accuracies, and with --control those of the dense model trained as long as a pruned one."""
    out = results.scores(model, validation, test_data)
    if args.control:
        control = checkpoints.trained_model(args, train_data, test_data, recipe.train, control=True)
        out.update(results.scores(control, validation, test_data, "control_accuracy"))
        out["control_epochs"] = args.epochs + checkpoints.fine_tuning_epochs(args)
    return out


def results_over_seeds(args, run, run_one, plot):
    """run_one(args of one seed) -> (rows, dense accuracies) for each seed from args.seed on; the
    JSON and the figures written (before anything is printed, so that a closed stdout cannot lose
    them). Returns (rows, dense): with several seeds each row holds the mean of every number that
    varies and <key>_std beside it, and "varies" for a value that is not a number and differs."""
    runs = [run_one(options.with_seed(args, seed)) for seed in outputs.seeds(args)]
    per_seed = [rows for rows, _ in runs]
    dense = [d for _, d in runs]
    rows = per_seed[0] if args.seeds == 1 else [results.mean_row(rows) for rows in zip(*per_seed)]
    summary = results.mean_row(dense) if len(dense) > 1 else dense[0]
    if args.json:
        extra = {k.replace("validation_accuracy", "validation_dense_accuracy"): v for k, v in summary.items()
                 if k not in ("accuracy", "accuracy_std")}  # written as dense_accuracy(_std)
        results.write_json(args.json, run.settings(args), rows, [d["accuracy"] for d in dense], per_seed, extra)
    if args.plot:
        plot(rows, summary["accuracy"])
    return rows, summary


def report(args, run, rows, dense, *, columns, notes=(), baselines="", closing=()):
    """Print what both scripts print: the table of rows in columns, the dense model's line, how the
    times were taken, this script's notes, what --baselines and --bits mean, closing lines, and
    where the models are."""
    print(results.markdown_table(rows, columns))
    print("\n" + tables.dense_line(dense, args.seeds))
    if run.busy is not None:
        print(tables.speed_note(args, run, rows))
    for line in notes:
        print(line)
    if args.baselines:
        print(f"Random and Layer-wise (--baselines), not fine-tuned: {baselines}")
    if args.bits:
        print(tables.compressed_note(args.bits))
    for line in closing:
        print(line)
    print(f"Models: {shown(args.save_dir)}")


def main(function):
    """Run function(); a user error, Ctrl-C or SIGTERM ends it with one line on stderr, never a
    traceback, and a closed stdout (a pipe into head) ends it quietly, its other files written."""
    name = Path(sys.argv[0]).name
    signal.signal(signal.SIGINT, startup.interrupt)
    signal.signal(signal.SIGTERM, startup.interrupt)
    try:
        function()
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
