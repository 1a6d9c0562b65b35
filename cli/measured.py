"""What a row measures beyond its accuracy: times against the dense model, the compressed file,
and --baselines' models of the same size chosen at random and layer by layer."""

import copy

import torch

from cli import outputs, recipe
from cli.results import scores
from pruning import inference, measure
from pruning import model as models

BUSY = 0.1  # share of the CPU used by other processes from which timings are said to be unreliable


def timed(args, run, dense, pruned, x):
    """{pruned's and dense's seconds on the batch x}, the two timed in turn (measure.in_turn),
    with --speed the speed-ups of pruning.for_inference(pruned) over dense at batch 1, 32 and
    10,000 and the multiply-add ratio beside them. The load is read before and after; a busy
    machine is remembered in run.busy, and said under the table."""
    run.busy = bool(run.busy) or busy()
    with models.evaluating([dense, pruned]), torch.no_grad():
        t_dense, t_pruned = measure.in_turn([dense, pruned], x)
    row = {"inference_time_s": t_pruned, "dense_inference_time_s": t_dense}
    if args.speed:
        row["speedup"] = inference.speedups(dense, pruned, x.cpu())
        row["flops_ratio"] = measure.flops(dense, x) / max(1, measure.flops(pruned, x))
    run.busy = run.busy or busy()
    return row


def busy():
    share = measure.cpu_used_by_others(0.2)
    return share is not None and share > BUSY


def compress(model, data, args, teacher, path, *, name, dense_bytes):
    """Quantize a pruned model to args.bits, fine-tune its shared values when args.finetune_epochs,
    and save it to path: the row's accuracies (the file holds the last model measured), file size,
    and how many times smaller it is than the dense file of dense_bytes. data: (train, validation
    or None, test)."""
    from pruning.formats import compressed
    train_data, validation, test_data = data
    quantized = compressed.quantize(model, args.bits)
    row = scores(quantized, validation, test_data, "quantized_accuracy")
    if args.finetune_epochs:
        recipe.finetune(quantized, train_data, args, args.finetune_epochs, teacher=teacher,
                        desc=f"fine-tuning shared values at {name}")
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


def unit_baselines(model, pruned, x, args, data):
    """--baselines for a row of activation pruning: the accuracy of model cut to pruned's widths
    (its input pixels too with --prune-inputs), the units chosen at random, and each layer's by
    the norm of their weights; neither fine-tuned. x: the images the cut measures on; data:
    (validation or None, test)."""
    from pruning import baselines, chain, methods, surgery
    validation, test_data = data
    widths = list(models.widths(pruned))
    spatial = surgery.spatial(chain.layers(model), x[:1])
    cut = [methods.shrink(model, widths, x, criterion, args.prune_inputs, spatial)
           for criterion in (baselines.random_units(args.seed), baselines.weight_norm_units)]
    return {**scores(cut[0], validation, test_data, "random_accuracy"),
            **scores(cut[1], validation, test_data, "layerwise_accuracy")}
