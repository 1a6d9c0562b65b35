"""Neural-network pruning for model compression: zero the smallest weights of a network, or remove
its quietest neurons and channels, in steps with fine-tuning; store the result small; load it back.

    import pruning
    pruning.zero_prune(model, 0.9, steps=5, finetune=pruning.finetuner((x, y), epochs=1))
    smaller = pruning.activation_prune(model, x, 0.5, steps=3, finetune=pruning.finetuner((x, y), epochs=1))
    pruning.one_shot(model, x[:2048], 0.9)  # no training: each layer rebuilt from calibration images
    pruning.save(smaller, "small.pt"); model = pruning.load("small.pt"); pruning.export_onnx(model, "small.onnx")
    fast = pruning.for_inference(model, batch_size=32)  # as model predicts, faster where its zeros allow

Importing it changes nothing outside it: no signal handlers, no threads, no environment.
"""

from pruning.chain import NotAChain
from pruning.data import mnist
from pruning.files import UserError
from pruning.inference import for_inference
from pruning.methods import activation_prune, group_lasso, obd_saliency, unit_saliency, zero_prune
from pruning.model import Normalize, count_params, count_weights, count_zeros, lenet5, mnist_mlp
from pruning.oneshot import one_shot
from pruning.storage import export_onnx, load, save
from pruning.training import accuracy, distillation_loss, finetuner, logits, predict, train
from pruning.variational import sparse_variational_dropout

__all__ = ["zero_prune", "activation_prune", "obd_saliency", "unit_saliency", "group_lasso",
           "sparse_variational_dropout", "one_shot", "save", "load", "export_onnx", "for_inference", "train",
           "finetuner", "distillation_loss", "logits", "predict", "accuracy", "count_params", "count_weights",
           "count_zeros", "mnist", "mnist_mlp", "lenet5", "Normalize", "NotAChain", "UserError"]
