"""Neural-network pruning for model compression: zero the smallest weights of a network, or remove
its quietest neurons and channels, in steps with fine-tuning; store the result small; load it back.

    import pruning
    pruning.zero_prune(model, 0.9, steps=5, finetune=pruning.finetuner((x, y), epochs=1))
    smaller = pruning.activation_prune(model, x, 0.5, steps=3, finetune=pruning.finetuner((x, y), epochs=1))
    pruning.one_shot(model, x[:2048], 0.9)  # no training: each layer rebuilt from calibration images
    pruning.save(smaller, "small.pt"); model = pruning.load("small.pt"); pruning.export_onnx(model, "small.onnx")
    fast = pruning.for_inference(model, batch_size=32)  # as model predicts, faster where its zeros allow

Importing it changes nothing outside it: no signal handlers, no threads, no environment. Imported
before PyTorch, it has PyTorch's OpenMP threads spin only briefly before they sleep while they
wait, as the scripts do (cli/startup.py): as fast on an idle machine, and no crawl beside another
busy process; the variable that says so is set only while PyTorch loads.
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & _os.environ.keys():
    _os.environ["GOMP_SPINCOUNT"] = "3000"  # GNU OpenMP reads it once, as PyTorch loads it
    try:
        import torch  # noqa: F401
    finally:
        del _os.environ["GOMP_SPINCOUNT"]

from pruning.chain import NotAChain
from pruning.criteria import keep_largest, magnitudes, threshold_for_sparsity
from pruning.data import mnist
from pruning.files import UserError
from pruning.formats import csr_bytes_needed, export_onnx, load, save
from pruning.inference import for_inference
from pruning.measure import flops
from pruning.methods import (
    activation_prune,
    group_lasso,
    mean_activations,
    obd_saliency,
    remove_below,
    unit_saliency,
    zero_prune,
)
from pruning.model import (
    Normalize,
    count_params,
    count_weights,
    count_zeros,
    kept_inputs,
    lenet5,
    mnist_mlp,
    weight_tensors,
    weighted,
    widths,
)
from pruning.oneshot import CALIBRATION, calibration_needed, check_pattern, one_shot
from pruning.oneshot import METHODS as ONE_SHOT_METHODS
from pruning.surgery import hold_below, hold_masked, make_permanent
from pruning.training import Recipe, accuracy, distillation_loss, finetuner, logits, predict, train
from pruning.variational import sparse_variational_dropout

__all__ = ["zero_prune", "activation_prune", "one_shot", "obd_saliency", "unit_saliency", "group_lasso",
           "sparse_variational_dropout", "mean_activations", "remove_below", "hold_below", "hold_masked",
           "make_permanent", "threshold_for_sparsity", "keep_largest", "magnitudes", "check_pattern",
           "calibration_needed", "ONE_SHOT_METHODS", "CALIBRATION", "save", "load", "export_onnx", "csr_bytes_needed",
           "for_inference",
           "flops", "Recipe", "train", "finetuner", "distillation_loss", "logits", "predict", "accuracy",
           "count_params", "count_weights", "count_zeros", "weighted", "weight_tensors", "widths", "kept_inputs",
           "mnist", "mnist_mlp", "lenet5",
           "Normalize", "NotAChain", "UserError"]
