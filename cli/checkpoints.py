"""The trained model, cached: a file named by a hash of its training settings (or --checkpoint),
loaded when its settings match, else trained and saved."""

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from pruning import files, storage, training
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


def training_config(args, seed=None, control=False):
    epochs = args.epochs + (fine_tuning_epochs(args) if control else 0)
    return {"model": args.model, **({"sizes": sizes(args)} if args.model == "mlp" else {}), "epochs": epochs,
            "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed if seed is None else seed,
            "validation": args.validation, "recipe": training.RECIPE, **({"bf16": True} if args.bf16 else {}),
            **({"shift": args.shift} if args.shift else {})}


def checkpoint_path(args, config, control=False):
    """--checkpoint (PATH-seedN with several seeds, PATH-control for --control), else one named by the settings."""
    if args.checkpoint:
        path = Path(args.checkpoint)
        suffix = (f"-seed{config['seed']}" if args.seeds > 1 else "") + ("-control" if control else "")
        return path.with_stem(path.stem + suffix) if suffix else path
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return ROOT / "checkpoints" / f"{config['model']}-{key}.pt"


def needs_writing(path, config, retrain):
    """Whether the checkpoint at path is to be written by this run: not when it is a checkpoint
    trained with config (then it is only read, from read-only media too). A model of ours that is
    not a checkpoint (a pruned one, say) is a result, refused here rather than replaced."""
    if files.kind_of(Path(path)) != "file":
        return True
    try:
        _, about = storage.load(path, with_about=True)
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
    if path.exists() and not args.retrain:
        try:
            model, about = storage.load(path, with_about=True)
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
    train(model, train_data, config["epochs"], args.lr, args.batch_size, config["seed"],
          desc="training the control" if control else "training", bf16=args.bf16, shift=args.shift)
    storage.save(model, path, about={"config": config}, option="--checkpoint")
    say_with_accuracy(f"model: trained {config['epochs']} epochs in {time.perf_counter() - start:.1f} s, "
                      f"saved to {path}", model, test_data)
    return model
