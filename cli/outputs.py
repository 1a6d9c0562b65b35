"""Where a run's files go: its models in a new folder of the project's (or --save-dir), one folder
per seed, the figures in --plot-dir; and every destination checked before any work."""

import sys
import warnings
from datetime import datetime
from pathlib import Path

import torch

from cli import destinations, plots, startup
from pruning import data, files, formats
from pruning.files import UserError, shown

ROOT = Path(__file__).resolve().parent.parent  # the project

made_folders = []  # made by this run: left out when nothing was written in them


def remove_empty_folders():
    """At the end of a run: remove the folders it made that stayed empty, and forget them all, so
    that a later run in this process never removes a folder of the same name made since."""
    while made_folders:
        folder = made_folders.pop()  # a run's seed folders before the run's
        try:
            folder.rmdir()
        except OSError:
            pass


def run_folder(script):
    """A new folder of the project's for this run's models: runs/<script>-<date>-<time>[-n]/."""
    runs = ROOT / "runs"
    if files.kind_of(runs) == "absent":
        runs.mkdir()
    stem = f"{Path(script).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    for n in range(1, 1000):
        folder = runs / (stem if n == 1 else f"{stem}-{n}")
        try:
            folder.mkdir()
            made_folders.append(folder)
            return folder
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot make a folder for the models in {runs}: {e.strerror}") from None
    raise UserError(f"cannot make a folder for the models in {runs}")


def seed_folder(args, seed):
    """Where a seed's files go: the save folder, or a folder seed-N in it with several seeds."""
    folder = Path(args.save_dir)
    return folder if args.seeds == 1 else folder / f"seed-{seed}"


def check_outputs(args, checkpoints, model_files, figures, only_read=()):
    """Check every file this run will write, before any work: no two outputs the same file, each
    destination free or a file of ours, its folder writable. model_files: the names written in
    each seed's folder; figures: the names written in --plot-dir; only_read: the checkpoints that
    fit and are only read."""
    # the folders before any is made; --json last, so that a data file named is refused as not ours
    refuse_the_data_folder(args.data_dir, [("--save-dir", args.save_dir), ("--plot-dir", args.plot_dir)])
    if not args.checkpoint and checkpoints:
        folder = checkpoints[0].parent
        if files.kind_of(folder) == "absent":  # the project's own folder, made on the first run
            folder.mkdir()
    args.save_dir = str(made("--save-dir", args.save_dir) if args.save_dir else run_folder(sys.argv[0]))
    planned = [("--checkpoint", path) for path in checkpoints] + [("--json", args.json)]
    for seed in seeds(args):
        folder = seed_folder(args, seed)
        kind = "link" if folder.is_symlink() else files.kind_of(folder)
        if kind not in ("absent", "folder"):
            raise UserError(f"--save-dir: {shown(folder)} is a {kind}, not a folder for seed {seed}'s models")
        planned += [("--save-dir", folder / name) for name in model_files]
    if args.plot or args.plot_dir:
        args.plot = True
        args.plot_dir = str(made("--plot-dir", args.plot_dir or ROOT / "figures"))
        planned += [("--plot-dir", Path(args.plot_dir) / name) for name in figures]
    destinations.check_distinct(planned)
    for option, path in planned:
        seed_folder_to_come = option == "--save-dir" and files.kind_of(Path(path).parent) == "absent"
        if path is not None and not seed_folder_to_come and path not in only_read:
            destinations.check_file_destination(option, path)
    refuse_the_data_folder(args.data_dir, [("--json", args.json)])


def refuse_the_data_folder(data_dir, destinations):
    """No output of the run goes into the MNIST folder it reads, nor anywhere below it.
    destinations: (option, path) pairs, path None when not given."""
    root = data.data_root(data_dir).resolve()
    for option, path in destinations:
        if path and Path(path).resolve().is_relative_to(root):
            raise UserError(f"{option} {shown(path)} is in the data folder {shown(root)}; give a path outside it")


def made(option, folder):
    """destinations.make_folder, remembering a folder it made so that it goes again if nothing is written in it."""
    absent = files.kind_of(Path(folder)) == "absent"
    folder = destinations.make_folder(option, folder)
    if absent:
        made_folders.append(folder)
    return folder


def seeds(args):
    return range(args.seed, args.seed + args.seeds)


def save_model(model, path, kind="dense"):
    """Save model under --save-dir; the tables set the CSR file's size beside the dense one's, so the
    library's warning that one is larger is not repeated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", formats.torchfile.LargerThanDense)
        return formats.save(model, path, kind)


def export_onnx(args, model, path):
    if args.onnx:
        with startup.signals_deferred():  # input: raw images, (N, 1, 28, 28) or (N, 784)
            formats.export_onnx(model.cpu(), path, torch.rand(2, 1, 28, 28))


def figure(fig, args, name):
    plots.save_figure(fig, Path(args.plot_dir) / name)
