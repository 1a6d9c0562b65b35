"""The trained model, cached: a file named by a hash of its training settings (or --checkpoint),
loaded when its settings match, else trained and saved."""

import copy
import functools
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from pruning import chain, files, formats, graph, training
from pruning import model as models
from pruning.files import UserError, shown

ROOT = Path(__file__).resolve().parent.parent  # the project
log = logging.getLogger("pruning")


def fine_tuning_epochs(args):
    """The epochs one pruned model is trained for in all after the dense training: with the group
    lasso's or the variational dropout's, and the fine-tuning of every step."""
    lasso = args.group_lasso_epochs if getattr(args, "group_lasso", None) else 0
    dropout = args.variational_dropout_epochs if getattr(args, "variational_dropout", None) else 0
    return lasso + dropout + (args.steps - 1) * (args.finetune_epochs or 0) + (args.final_epochs or 0)


def sizes(args):
    return [models.MLP_SIZES[0], *args.hidden, models.MLP_SIZES[-1]]


@functools.cache
def given_model(path):
    """The network of --model FILE, read once: a torch.export file or a model file of this project,
    as pruning.load reads it, taking raw images (a Normalize(0, 1) first that shapes them as the
    network's input) where it does not start with the project's input normalisation."""
    model = formats.load(path)
    if isinstance(model, graph.Graph) and isinstance(model.layers[0], (models.Normalize, models.KeepInputs)) or \
            isinstance(model, nn.Sequential) and isinstance(model[0], (models.Normalize, models.KeepInputs)):
        return model
    shape = getattr(model, "exported_input_shape", None) or chain.input_shape(graph.layers_of(model))
    if shape is None or math.prod(shape) != 784:
        raise UserError(f"--model {shown(path)}: its network reads inputs of shape {shape}, not MNIST's 784 pixels")
    first = models.Normalize(0.0, 1.0, shape)  # raw images, shaped as the network reads them
    if isinstance(model, graph.Graph):
        reads = [[-1]] + [[r + 1 for r in node] for node in model.inputs]
        return graph.Graph([first, *model.layers], reads).eval()
    return nn.Sequential(first, *model).eval()


@functools.cache
def given_units(path):
    """The activations one image makes in the network of --model FILE."""
    units = 0

    def count(module, args, output):
        nonlocal units
        units += output.numel()

    model = given_model(path)
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 784))
    finally:
        for h in hooks:
            h.remove()
    return units


def training_config(args, seed=None, control=False):
    epochs = args.epochs + (fine_tuning_epochs(args) if control else 0)
    if is_file(args):
        return {"model": "file", "file": str(Path(args.model).resolve()), "seed": args.seed if seed is None else seed}
    return {"model": args.model, **({"sizes": sizes(args)} if args.model == "mlp" else {}), "epochs": epochs,
            "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed if seed is None else seed,
            "validation": args.validation, "recipe": training.RECIPE, **({"bf16": True} if args.bf16 else {}),
            **({"shift": args.shift} if args.shift else {})}


def is_file(args):
    return args.model not in ("mlp", "lenet5")


def checkpoint_path(args, config, control=False):
    """--checkpoint (PATH-seedN with several seeds, PATH-control for --control), else one named by the
    settings; --model FILE itself for a network given as a file."""
    if is_file(args):
        return Path(args.model)
    if args.checkpoint:
        path = Path(args.checkpoint)
        suffix = (f"-seed{config['seed']}" if args.seeds > 1 else "") + ("-control" if control else "")
        return path.with_stem(path.stem + suffix) if suffix else path
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return ROOT / "checkpoints" / f"{config['model']}-{key}.pt"


def needs_writing(path, config, retrain):
    if config.get("model") == "file":
        return False  # the user's network: only read
    """Whether the checkpoint at path is to be written by this run: not when it is a checkpoint
    trained with config (then it is only read, from read-only media too). A model of ours that is
    not a checkpoint (a pruned one, say) is a result, refused here rather than replaced."""
    if files.kind_of(Path(path)) != "file":
        return True
    try:
        _, about = formats.load(path, with_about=True)
    except UserError:
        return True  # not ours, or damaged: the destination's own check decides
    if "config" not in about:
        raise UserError(f"--checkpoint {shown(path)} is a model this project saved as a result, not a trained "
                        "checkpoint; refusing to replace it (give another path)")
    return retrain or about["config"] != config


def new_model(args):
    return models.lenet5() if args.model == "lenet5" else models.mnist_mlp(sizes(args))


def say_with_accuracy(line, model, test_data):
    """Log line with the model's test accuracy, evaluated only where the line is printed (not for --quiet)."""
    if log.isEnabledFor(logging.INFO):
        log.info(f"{line} (test accuracy {training.accuracy(model, test_data):.2f}%)")


def trained_model(args, train_data, test_data, train, control=False):
    """The model trained with the settings in args: from its checkpoint when one fits, else trained and saved."""
    config = training_config(args, control=control)
    path = checkpoint_path(args, config, control)
    if is_file(args):
        model = copy.deepcopy(given_model(args.model)).to(train_data[0].device)
        say_with_accuracy(f"model: {shown(path)}, as given", model, test_data)
        return model
    if path.exists() and not args.retrain:
        try:
            model, about = formats.load(path, with_about=True)
            problem = None if about.get("config") == config else "made with other settings"
        except UserError as e:
            model, problem = None, str(e).removeprefix(f"{shown(path)} ")
        if problem is None:
            model.to(train_data[0].device)
            say_with_accuracy(f"model: loaded {path}", model, test_data)
            return model
        log.warning(f"model: checkpoint {path}: {problem}; retraining")
    torch.manual_seed(config["seed"])
    model = new_model(args).to(train_data[0].device)
    start = time.perf_counter()
    recipe = training.Recipe(epochs=config["epochs"], lr=args.lr, batch_size=args.batch_size, seed=config["seed"],
                             bf16=args.bf16, shift=args.shift)
    train(model, train_data, recipe, desc="training the control" if control else "training")
    formats.save(model, path, about={"config": config})
    say_with_accuracy(f"model: trained {config['epochs']} epochs in {time.perf_counter() - start:.1f} s, "
                      f"saved to {path}", model, test_data)
    return model
