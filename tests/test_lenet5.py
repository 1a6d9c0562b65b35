"""LeNet-5 through both scripts on a small MNIST (the first 3,000 training and 1,000 test images), as
the README's commands run it on the whole set: conv kernels and linear weights ranked together,
channels removed with their block of columns after the Flatten, files that load as their rows say."""


import pytest
import torch
from test_mnist import assert_fast_predicts_as_loaded

import pruning
from pruning import data as mnist
from pruning import training

pytestmark = pytest.mark.slow


@pytest.fixture
def run(json_of):
    """Run a script on LeNet-5 and the small MNIST (conftest.json_of): (its JSON, its stdout)."""
    def run(script, small_mnist, tmp_path, *args):
        return json_of(script, tmp_path, "--model", "lenet5", "--data-dir", small_mnist, "--epochs", "2",
                       "--checkpoint", tmp_path / "lenet5.pt", "--save-dir", tmp_path / "models", *args)
    return run


def test_lenet5_zero_pruning_ranks_conv_and_linear_weights_together(run, small_mnist, tmp_path):
    results, stdout = run("zero_pruning.py", small_mnist, tmp_path, "--sparsity", "0.9", "--steps", "2",
                          "--finetune-epochs", "2", "--final-epochs", "2", "--distill", "--bits", "5")
    (row,) = results["rows"]
    assert row["original_params"] == 20 * 25 + 50 * 20 * 25 + 800 * 500 + 500 * 10 == 430_500
    assert row["zero_percentage"] >= 90
    assert 0 < row["flops"] < 0.5 * (20 * 25 * 576 + 50 * 20 * 25 * 64 + 800 * 500 + 500 * 10)  # dense: 2,293,000
    model = pruning.load(tmp_path / "models" / "csr-sparsity0.9.pt")
    conv1, conv2 = (m for m in model if isinstance(m, torch.nn.Conv2d))
    assert (conv1.weight != 0).float().mean() < 1 and (conv2.weight != 0).float().mean() < 1  # ranked together
    test = mnist.load(small_mnist)[1]
    assert training.accuracy(model, test) == row["finetuned_accuracy"]
    assert training.accuracy(pruning.load(tmp_path / "models" / "compressed-sparsity0.9.bin"), test) == \
        row["quantized_finetuned_accuracy"]
    for name in ("dense.pt", "csr-sparsity0.9.pt", "compressed-sparsity0.9.bin"):
        assert_fast_predicts_as_loaded(tmp_path / "models" / name, test[0])


@pytest.mark.parametrize("args", [["--reduction", "0.8", "--steps", "2", "--finetune-epochs", "3",
                                   "--final-epochs", "3", "--distill"],
                                  ["--thresholds", "0", "0.5"]])
def test_lenet5_activation_pruning_removes_channels(run, args, small_mnist, tmp_path):
    results, stdout = run("activation_pruning.py", small_mnist, tmp_path, *args)
    test = mnist.load(small_mnist)[1]
    for row in results["rows"]:
        name = f"{'reduction' if 'reduction' in row else 'threshold'}{row.get('reduction', row.get('threshold')):.4g}"
        model = pruning.load(tmp_path / "models" / f"activation-{name}.pt")
        assert pruning.count_params(model) == row["new_params"]
        assert training.accuracy(model, test) == row.get("finetuned_accuracy", row["accuracy"])
        conv1, conv2 = (m for m in model if isinstance(m, torch.nn.Conv2d))
        linear = next(m for m in model if isinstance(m, torch.nn.Linear))
        assert [conv1.out_channels, conv2.out_channels, linear.out_features] == row["hidden_widths"]
        assert linear.in_features == 16 * conv2.out_channels  # its block of columns went with each channel
        assert_fast_predicts_as_loaded(tmp_path / "models" / f"activation-{name}.pt", test[0])
    if "--reduction" in args:
        assert results["rows"][0]["size_reduction"] >= 80 and results["rows"][0]["hidden_widths"][0] < 20
