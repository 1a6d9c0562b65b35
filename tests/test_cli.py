"""Bad input on the command line: one clear error line, exit code 2, and no file written or damaged."""

import sys

import pytest
import torch
import torchvision

import activation_pruning
import common
import zero_pruning

SCRIPTS = ["zero_pruning.py", "activation_pruning.py"]
MAINS = {"zero_pruning.py": zero_pruning.main, "activation_pruning.py": activation_pruning.main}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Point torchvision's download at a closed local port, so a missing file fails at once."""
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])


def files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_rejected(script, args, message, tmp_path, capsys, monkeypatch, data_dir=None):
    """Run script's main as its command line does, with a precious checkpoint beside it:
    it must fail with one error line and exit code 2, and touch no file."""
    checkpoint = tmp_path / "precious.pt"
    checkpoint.write_bytes(b"a model someone cares about")
    before = files(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *args, "--checkpoint", str(checkpoint)])
    monkeypatch.setenv("MNIST_DATA_DIR", str(data_dir or tmp_path))
    with pytest.raises(SystemExit) as exit:
        common.run(MAINS[script])
    out, err = capsys.readouterr()
    assert exit.value.code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error:") and message in last, err
    assert "usage:" not in err and "Traceback" not in err, err
    assert out == ""
    assert files(tmp_path) == before


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, message", [
    (["--thresholds", "-0.1"], "must be a finite number >= 0, not -0.1"),
    (["--thresholds", "nan"], "must be a finite number >= 0, not nan"),
    (["--thresholds", "inf"], "must be a finite number >= 0, not inf"),
    (["--thresholds", "0.1", "abc"], "not a number: 'abc'"),
    (["--thresholds"], "expected at least one argument"),
    (["--thresholds", "0.1", "0.2", "0.1"], "duplicate thresholds"),
    (["--epochs", "0"], "must be > 0, not 0"),
    (["--epochs", "-3"], "must be > 0, not -3"),
    (["--epochs", "1.5"], "not an integer: '1.5'"),
    (["--batch-size", "0"], "must be > 0, not 0"),
    (["--lr", "-1"], "must be > 0, not -1"),
    (["--finetune-epochs", "0"], "must be > 0, not 0"),
    (["--finetune-epochs", "-1"], "must be > 0, not -1"),
    (["--batch-size", "-5"], "must be > 0, not -5"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--hidden", "300", "0"], "must be > 0, not 0"),
    (["--hidden", "-100"], "must be > 0, not -100"),
    (["--hidden"], "expected at least one argument"),
    (["--temperature", "0"], "must be > 0, not 0"),
    (["--seeds", "0"], "must be > 0, not 0"),
    (["--seeds", "-2"], "must be > 0, not -2"),
    (["--seeds", "2.5"], "not an integer: '2.5'"),
    (["--bits", "1"], "must be 2 to 8, not 1"),
    (["--bits", "9"], "must be 2 to 8, not 9"),
    (["--bits", "five"], "not an integer: 'five'"),
    (["--distill-weight", "1.5"], "must be in [0, 1], not 1.5"),
    (["--distill-weight", "nan"], "must be in [0, 1], not nan"),
    (["--json", "no/such/folder/out.json"], "folder no/such/folder does not exist"),
    (["--json", "/proc/out.json"], "cannot write /proc/out.json"),
    (["--save-dir", "no/such/folder"], "folder no/such/folder does not exist"),
])
def test_bad_options_are_rejected(script, args, message, tmp_path, capsys, monkeypatch):
    assert_rejected(script, args, message, tmp_path, capsys, monkeypatch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
@pytest.mark.parametrize("script", SCRIPTS)
def test_cuda_without_a_gpu_is_rejected(script, tmp_path, capsys, monkeypatch):
    assert_rejected(script, ["--device", "cuda"], "no CUDA device is available", tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "--sparsity takes fractions in [0, 1)"),
    (["--sparsity", "1"], "--sparsity takes fractions in [0, 1)"),
    (["--sparsity", "0.9", "--steps", "0", "--finetune-epochs", "1"], "must be > 0, not 0"),
    (["--sparsity", "0.9", "--steps", "-2", "--finetune-epochs", "1"], "must be > 0, not -2"),
    (["--steps", "10", "--finetune-epochs", "1"], "--steps takes --sparsity and --finetune-epochs"),
    (["--sparsity", "0.9", "--steps", "10"], "--steps takes --sparsity and --finetune-epochs"),
    (["--sparsity", "0.9", "--finetune-epochs", "1", "--final-epochs", "3"], "--final-epochs takes --steps 2"),
    (["--sparsity", "nan"], "--sparsity takes fractions in [0, 1)"),
    (["--sparsity", "0.9", "0.9"], "duplicate fractions in --sparsity 0.9 0.9"),
    (["--sparsity", "0.9", "--thresholds", "0.1"], "give --thresholds or --sparsity, not both"),
])
def test_zero_pruning_sparsity_must_be_distinct_fractions(args, message, tmp_path, capsys, monkeypatch):
    assert_rejected("zero_pruning.py", args, message, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("args, message", [
    (["--reduction", "0"], "must be a fraction between 0 and 1, not 0"),
    (["--reduction", "1"], "must be a fraction between 0 and 1, not 1"),
    (["--reduction", "-0.5"], "must be a fraction between 0 and 1, not -0.5"),
    (["--reduction", "most"], "not a number: 'most'"),
    (["--reduction", "0.9", "--thresholds", "0.5"], "give --thresholds or --reduction, not both"),
    (["--reduction", "0.9", "0.9"], "duplicate fractions in --reduction"),
    (["--prune-inputs"], "--prune-inputs takes --reduction"),
    (["--criterion", "contribution"], "--criterion takes --reduction"),
    (["--criterion", "loudness", "--reduction", "0.9"], "invalid choice: 'loudness'"),
    (["--reduction", "0.9", "--steps", "3"], "--steps takes --reduction and --finetune-epochs"),
])
def test_activation_pruning_reduction_options_are_checked(args, message, tmp_path, capsys, monkeypatch):
    assert_rejected("activation_pruning.py", args, message, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("value", ["0", "-8", "eight"])
def test_activation_pruning_multiple_must_be_a_positive_integer(value, tmp_path, capsys, monkeypatch):
    message = "not an integer" if value == "eight" else f"must be > 0, not {value}"
    assert_rejected("activation_pruning.py", ["--multiple-of", value], message, tmp_path, capsys, monkeypatch)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def idx(magic, *shape):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    size = 1
    for n in shape:
        size *= n
    return header + bytes(size)


def mnist_folder(root):
    raw = root / "MNIST" / "raw"
    for prefix, n in [("train", 4), ("t10k", 2)]:
        write(raw / f"{prefix}-images-idx3-ubyte", idx(0x803, n, 28, 28))
        write(raw / f"{prefix}-labels-idx1-ubyte", idx(0x801, n))
    return raw


def unreadable(raw, name):
    """A file that cannot be read, even by root: a folder in its place."""
    (raw / name).unlink()
    (raw / name).mkdir()


DATA_FOLDERS = {  # case: (make the folder, message)
    "missing": (lambda data: None, "the download failed"),
    "empty": (lambda data: data.mkdir(), "the download failed"),
    "truncated": (lambda data: write(mnist_folder(data) / "t10k-images-idx3-ubyte", idx(0x803, 2, 28, 28)[:-100]),
                  "is truncated or corrupted"),
    "wrong magic": (lambda data: write(mnist_folder(data) / "train-labels-idx1-ubyte", idx(0x803, 4)),
                    "is not an MNIST IDX file"),
    "unreadable": (lambda data: unreadable(mnist_folder(data), "train-labels-idx1-ubyte"), "cannot read"),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", DATA_FOLDERS)
def test_broken_data_folders_are_reported(script, case, tmp_path, capsys, monkeypatch):
    make, message = DATA_FOLDERS[case]
    make(tmp_path / "data")
    assert_rejected(script, [], message, tmp_path, capsys, monkeypatch, data_dir=tmp_path / "data")
