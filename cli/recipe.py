"""Training as the command line runs it: the recipe its options give (--finetune-lr, --batch-size,
--seed, --temperature, --distill-weight, --bf16, --shift, --input-dropout), what fine-tuning distils
from, a progress line per epoch, divergence said in one line, and the fine-tuning of each step."""

import contextlib
import copy

from cli.progress import progress
from pruning import training
from pruning.files import UserError


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


def finetune(model, train_data, args, epochs, *, teacher=None, desc="fine-tuning", penalty=None):
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
        finetune(model, train_data, args, epochs, teacher=teacher,
                 desc=f"fine-tuning at {name}" + (f", step {step}/{args.steps}" if args.steps > 1 else ""))
    return finetune_step
