"""pruning.exported: torch.export files (ExportedProgram, .pt2) read back as layers, their logits
the program's, and pruned, saved and loaded as any network of the library."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pruning


class UsersCNN(nn.Module):
    """A network whose class the reader of its file does not have: convolutions with BatchNorm, a
    residual sum, GELU, pooling of both kinds."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 5, padding="same"), nn.BatchNorm2d(8)
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 7 * 7, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.avg_pool2d(x + self.conv3(F.relu(self.conv2(x))), 2)
        return self.fc2(F.gelu(self.fc1(torch.flatten(x, 1))))


def exported(model, path, example=torch.rand(2, 1, 28, 28)):
    torch.export.save(torch.export.export(model.eval(), (example,)), path)
    return path


def users_cnn():
    torch.manual_seed(0)
    model = UsersCNN()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_an_exported_program_loads_as_layers_with_its_logits(tmp_path):
    model = users_cnn()
    loaded = pruning.load(exported(model, tmp_path / "cnn.pt2"))
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert loaded.exported_input_shape == (1, 28, 28) and not loaded.training


def test_an_exported_network_is_pruned_saved_and_loaded_as_any_other(tmp_path):
    loaded = pruning.load(exported(users_cnn(), tmp_path / "cnn.pt2"))
    pruning.zero_prune(loaded, 0.9)
    pruning.save(loaded, tmp_path / "z.pt", storage="csr")
    again = pruning.load(tmp_path / "z.pt")
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))
    assert pruning.count_zeros(again) == pytest.approx(0.9 * pruning.count_weights(again), abs=1)
    smaller = pruning.activation_prune(pruning.load(tmp_path / "cnn.pt2"), torch.rand(64, 1, 28, 28), reduction=0.3)
    assert pruning.count_params(smaller) < 0.75 * pruning.count_params(users_cnn())


def test_a_program_computing_what_no_layer_computes_is_refused_in_one_line(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) * 3

    path = exported(Scaled(), tmp_path / "scaled.pt2", torch.rand(2, 4))
    with pytest.raises(pruning.UserError, match=r"cannot be rebuilt as layers: it computes aten.mul.Tensor") as e:
        pruning.load(path)
    assert "\n" not in str(e.value)


def test_a_zip_that_is_no_export_is_still_not_a_model_file(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / "a.pt2", "w") as archive:
        archive.writestr("x/data.pkl", b"not a model")
    with pytest.raises(pruning.UserError, match="not a model file of this project|cannot be loaded"):
        pruning.load(tmp_path / "a.pt2")


@pytest.mark.slow
def test_the_scripts_print_their_tables_for_a_network_given_as_an_exported_file(mnist_dir, tmp_path):
    import json

    from conftest import run_script
    path = exported(users_cnn(), tmp_path / "users.pt2")  # its class is not importable by the scripts
    result = run_script("zero_pruning.py", "--model", path, "--sparsity", "0.5", "0.9", "--json", tmp_path / "z.json")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "z.json").read_text())["rows"]
    weights = pruning.count_weights(users_cnn())
    assert [r["sparsity"] for r in rows] == [0.5, 0.9] and all(r["original_params"] == weights for r in rows)
    assert "| Sparsity |" in result.stdout and f"model: {path}, as given" in result.stderr
    refused = run_script("activation_pruning.py", "--model", path)
    assert refused.returncode == 2 and "joins tensors" in refused.stderr and "Traceback" not in refused.stderr
