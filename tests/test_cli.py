"""Bad input on the command line: one clear error line, exit code 2, and no file written or damaged."""

import os
import stat
import zipfile

import pytest
import torch
from conftest import main_in_process, no_network

from pruning import files as files_module
from pruning import formats
from pruning.model import mnist_mlp

SCRIPTS = ["zero_pruning.py", "activation_pruning.py"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    no_network(monkeypatch)


def files(folder):
    """Every file under folder with its bytes and mode, and every other thing there by its kind."""
    return {p: (p.read_bytes(), p.stat().st_mode) if p.is_file() else stat.S_IFMT(p.stat().st_mode)
            for p in sorted(folder.rglob("*"))}


def assert_rejected(script, args, message, tmp_path, capsys, monkeypatch, data_dir=None, checkpoint=True):
    """Run script's main as its command line does, with a precious checkpoint beside it:
    it must fail with one error line and exit code 2, and touch no file."""
    precious = tmp_path / "precious.pt"  # a checkpoint of this project, made with other settings
    formats.save(mnist_mlp([784, 10]), precious, about={"config": {"sizes": [784, 10]}})
    before = files(tmp_path)
    monkeypatch.setenv("MNIST_DATA_DIR", str(data_dir or tmp_path / "data"))
    code = main_in_process(monkeypatch, script, *args, *(["--checkpoint", precious] if checkpoint else []))
    out, err = capsys.readouterr()
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error:") and message in last, err
    assert "usage:" not in err and "Traceback" not in err, err
    assert out == ""
    assert files(tmp_path) == before


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, message", [
    (["--thresholds", "-0.1"], "must be >= 0, not -0.1"),
    (["--thresholds", "nan"], "not a number: 'nan'"),
    (["--thresholds", "inf"], "must be at most 1e+06, not inf"),
    (["--thresholds", "0.1", "abc"], "not a number: 'abc'"),
    (["--thresholds"], "expected at least one argument"),
    (["--thresholds", "0.1", "0.2", "0.1"], "0.1 and 0.1 are the same"),
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
    (["--shift", "-1"], "must be >= 0, not -1"),
    (["--shift", "15"], "must be at most 14, not 15"),
    (["--seeds", "0"], "must be > 0, not 0"),
    (["--seeds", "-2"], "must be > 0, not -2"),
    (["--seeds", "2.5"], "not an integer: '2.5'"),
    (["--bits", "1"], "must be >= 2, not 1"),
    (["--bits", "9"], "must be at most 8, not 9"),
    (["--bits", "five"], "not an integer: 'five'"),
    (["--distill-weight", "1.5"], "must be at most 1, not 1.5"),
    (["--distill-weight", "nan"], "not a number: 'nan'"),
    (["--json", "no/such/folder/out.json"], "folder no/such/folder does not exist"),
    (["--json", "/proc/out.json"], "cannot write /proc/out.json"),
    (["--save-dir", "no/such/folder"], "folder no/such/folder does not exist"),
    (["--model", "no/such/net.pt2"], "no/such/net.pt2 does not exist"),
])
def test_bad_options_are_rejected(script, args, message, tmp_path, capsys, monkeypatch):
    assert_rejected(script, args, message, tmp_path, capsys, monkeypatch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
@pytest.mark.parametrize("script", SCRIPTS)
def test_cuda_without_a_gpu_is_rejected(script, tmp_path, capsys, monkeypatch):
    assert_rejected(script, ["--device", "cuda"], "no CUDA device is available", tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "must be < 1, not 1.5"),
    (["--sparsity", "1"], "must be < 1, not 1"),
    (["--sparsity", "0.9", "--steps", "0", "--finetune-epochs", "1"], "must be > 0, not 0"),
    (["--sparsity", "0.9", "--steps", "-2", "--finetune-epochs", "1"], "must be > 0, not -2"),
    (["--steps", "10", "--finetune-epochs", "1"], "--steps takes --sparsity"),
    (["--sparsity", "0.9", "--finetune-epochs", "1", "--final-epochs", "3"], "--final-epochs takes --steps 2"),
    (["--sparsity", "nan"], "not a number: 'nan'"),
    (["--sparsity", "0.9", "0.9"], "--sparsity: 0.9 and 0.9 are the same"),
    (["--sparsity", "0.9", "--thresholds", "0.1"], "give --thresholds or --sparsity, not both"),
    (["--criterion", "saliency"], "--criterion saliency ranks the weights toward a --sparsity"),
    (["--criterion", "fisher", "--sparsity", "0.9"], "invalid choice: 'fisher'"),
    (["--sparsity", "0.9", "--variational-dropout", "10"], "--variational-dropout takes --steps 2 or more"),
    (["--sparsity", "0.9", "--steps", "2", "--variational-dropout", "-1"], "must be >= 0, not -1"),
    (["--pattern", "2:4"], "--pattern takes --one-shot"),
    (["--one-shot", "reconstruct"], "--one-shot takes --sparsity (or --pattern)"),
    (["--one-shot", "obs", "--sparsity", "0.9"], "invalid choice: 'obs'"),
    (["--one-shot", "wanda", "--pattern", "4:2"], "not N:M with 0 < N < M <= 64: '4:2'"),
    (["--one-shot", "wanda", "--pattern", "2:4", "--sparsity", "0.9"], "--pattern 2:4 zeroes 0.5 of the weights"),
    (["--one-shot", "magnitude", "--sparsity", "0.9", "--steps", "3"], "--one-shot prunes in one step"),
    (["--one-shot", "magnitude", "--sparsity", "0.9", "--calibration", "0"], "must be > 0, not 0"),
    (["--sparsity", "0.9", "--calibration", "100"], "--calibration takes --one-shot"),
    (["--one-shot", "reconstruct", "--sparsity", "0.9", "--calibration", "16"],
     "--calibration 16: reconstructing this network needs at least 196 images"),
    (["--one-shot", "magnitude", "--sparsity", "0.9", "--calibration", "60000", "--validation", "50000"],
     "the training set holds 10,000 images once --validation 50,000 are held out"),
])
def test_zero_pruning_sparsity_must_be_distinct_fractions(args, message, tmp_path, capsys, monkeypatch):
    assert_rejected("zero_pruning.py", args, message, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("args, message", [
    (["--reduction", "0"], "must be > 0, not 0"),
    (["--reduction", "1"], "must be < 1, not 1"),
    (["--reduction", "-0.5"], "must be > 0, not -0.5"),
    (["--reduction", "most"], "not a number: 'most'"),
    (["--reduction", "0.9", "--thresholds", "0.5"], "give --thresholds or --reduction, not both"),
    (["--reduction", "0.9", "0.9"], "--reduction: 0.9 and 0.9 are the same"),
    (["--prune-inputs"], "--prune-inputs takes --reduction"),
    (["--criterion", "contribution"], "--criterion takes --reduction"),
    (["--criterion", "loudness", "--reduction", "0.9"], "invalid choice: 'loudness'"),
    (["--steps", "3"], "--steps takes --reduction"),
    (["--model", "lenet5", "--reduction", "0.9", "--prune-inputs"], "--prune-inputs takes --model mlp"),
    (["--group-lasso", "0.003"], "--group-lasso takes --reduction"),
    (["--group-lasso", "-1", "--reduction", "0.9"], "must be >= 0, not -1"),
    (["--group-lasso", "2", "--reduction", "0.9"], "must be at most 1, not 2"),
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
    "unreadable": (lambda data: unreadable(mnist_folder(data), "train-labels-idx1-ubyte"), "is not a regular file"),
    "no images": (lambda data: (write(mnist_folder(data) / "t10k-images-idx3-ubyte", idx(0x803, 0, 28, 28)),
                                write(data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", idx(0x801, 0))),
                  "holds no images"),
    "huge header": (lambda data: write(mnist_folder(data) / "train-images-idx3-ubyte", idx(0x803, 4, 28, 28)[:4]
                                       + (2 ** 31).to_bytes(4, "big") + idx(0x803, 4, 28, 28)[8:]),
                    "is truncated or corrupted"),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", DATA_FOLDERS)
def test_broken_data_folders_are_reported(script, case, tmp_path, capsys, monkeypatch):
    make, message = DATA_FOLDERS[case]
    make(tmp_path / "data")
    assert_rejected(script, [], message, tmp_path, capsys, monkeypatch, data_dir=tmp_path / "data")


# Nothing that is not ours is replaced, and every destination is checked before the work --------

def not_ours(kind, tmp_path):
    """A path where a checkpoint is asked for that holds something else."""
    path = tmp_path / "thing"
    if kind == "MNIST labels":
        path.write_bytes((0x801).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 2, 1]))
    elif kind == "JSON":
        path.write_text('{"results": [1, 2, 3]}')
    elif kind == "photo":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes/data.txt", "someone's notes")
    elif kind == "folder":
        path.mkdir()
    elif kind == "pipe":
        os.mkfifo(path)
    return path


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("kind, message", [
    ("MNIST labels", "is not a file this project wrote; refusing to replace it"),
    ("JSON", "is not a file this project wrote"),
    ("photo", "is not a file this project wrote"),
    ("zip", "is not a file this project wrote"),
    ("folder", "is a folder, not a file"),
    ("pipe", "is a pipe, not a file"),
])
def test_a_checkpoint_path_holding_something_else_is_refused_before_any_work(script, kind, message, tmp_path, capsys,
                                                                              monkeypatch):
    path = not_ours(kind, tmp_path)
    assert_rejected(script, ["--checkpoint", str(path)], message, tmp_path, capsys, monkeypatch, checkpoint=False)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_device_is_never_replaced(script, tmp_path, capsys, monkeypatch):
    assert_rejected(script, ["--checkpoint", "/dev/null"], "/dev/null is a device, not a file", tmp_path, capsys,
                    monkeypatch, checkpoint=False)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("make, args, message", [
    (lambda t: None, ["--checkpoint", "{t}/x.pt", "--json", "{t}/x.pt"], "--checkpoint and --json name the same file"),
    (lambda t: (t / "out").mkdir(), ["--checkpoint", "{t}/out/dense.pt", "--save-dir", "{t}/out"],
     "--checkpoint and --save-dir name the same file"),
    (lambda t: (t / "out.json").mkdir(), ["--json", "{t}/out.json"], "--json {t}/out.json is a folder, not a file"),
    (lambda t: None, ["--json", "/dev/null"], "--json /dev/null is a device, not a file"),
    (lambda t: (t / "file").write_text("x"), ["--save-dir", "{t}/file"], "--save-dir {t}/file is a file, not a folder"),
    (lambda t: (t / "file").write_text("x"), ["--plot-dir", "{t}/file"], "--plot-dir {t}/file is a file, not a folder"),
    (lambda t: None, ["--json", "{t}/" + "n" * 300 + ".json"], "File name too long"),
    (lambda t: None, ["--plot-dir", "/proc/figures"], "cannot make the folder /proc/figures"),
])
def test_destinations_are_checked_before_any_work(script, make, args, message, tmp_path, capsys, monkeypatch):
    make(tmp_path)
    args = [a.format(t=tmp_path) for a in args]
    assert_rejected(script, args, message.format(t=tmp_path), tmp_path, capsys, monkeypatch,
                    checkpoint="--checkpoint" not in args)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args", [["--save-dir", "{d}"], ["--save-dir", "{d}/models"], ["--plot-dir", "{d}/MNIST/raw"],
                                  ["--json", "{d}/results.json"]])
def test_no_output_goes_into_the_data_folder(script, args, tmp_path, capsys, monkeypatch):
    data = tmp_path / "mnist"
    (data / "MNIST" / "raw").mkdir(parents=True)
    args = [a.format(d=data) for a in args]
    assert_rejected(script, args, f"{args[0]} {args[1]} is in the data folder {data}; give a path outside it", tmp_path,
                    capsys, monkeypatch, data_dir=data)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, message", [
    (["--epochs", str(2 ** 63)], "must be at most 1,000"),
    (["--finetune-epochs", "100000"], "must be at most 1,000"),
    (["--batch-size", str(2 ** 40)], "must be at most 60,000"),
    (["--seed", str(2 ** 64)], "must be at most 4,294,967,195"),
    (["--seed", "-1"], "must be >= 0, not -1"),
    (["--threads", str(2 ** 31)], "must be at most 1,024"),
    (["--lr", "1e300"], "must be at most 10"),
    (["--finetune-lr", "1e30"], "must be at most 10"),
    (["--hidden", "300", str(10 ** 9)], "must be at most 100,000"),
    (["--thresholds", "3e38"], "must be at most 1e+06"),
    (["--thresholds", "0.10001", "0.10002"], "0.10001 and 0.10002 both print as 0.1"),
])
def test_numbers_beyond_what_the_code_can_honour_are_rejected(script, args, message, tmp_path, capsys, monkeypatch):
    assert_rejected(script, args, message, tmp_path, capsys, monkeypatch)


def test_more_threads_than_cores_is_accepted_with_a_warning(tmp_path, capsys, caplog, monkeypatch):
    threads = torch.get_num_threads()
    try:
        code = main_in_process(monkeypatch, "zero_pruning.py", "--threads", os.cpu_count() + 1, "--data-dir",
                               tmp_path / "none")
    finally:
        torch.set_num_threads(threads)
    assert code == 2 and "is not in" in capsys.readouterr().err  # the data is missing
    assert "more threads than cores make it slower" in caplog.text  # said before


def test_abandoned_temporary_files_are_removed_but_not_a_live_writers_nor_by_name_alone(tmp_path):
    ours = b'{"written_by": "%s"}' % files_module.WRITER.encode()
    dead = tmp_path / ".out.json.4194303.1.tmp"  # above Linux's largest process id
    cut_short = tmp_path / ".out.json.4194303.2.tmp"
    users = tmp_path / ".out.json.4194303.3.tmp"  # a user's file that happens to be named so
    live = tmp_path / f".out.json.{os.getpid()}.99.tmp"
    dead.write_bytes(ours)
    cut_short.write_bytes(ours[:9])
    users.write_text('{"settings": 1, "rows": [], "dense_accuracy": 0}')
    live.write_bytes(ours)
    files_module.atomic_write(tmp_path / "out.json", lambda f: f.write(ours))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cut_short.name, users.name, live.name, "out.json"])
    assert users.read_text() == '{"settings": 1, "rows": [], "dense_accuracy": 0}'


def test_a_json_with_our_keys_but_not_our_mark_is_not_ours(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"settings": {}, "rows": [], "dense_accuracy": 98}')
    with pytest.raises(files_module.UserError, match="is not a file this project wrote"):
        files_module.atomic_write(notes, lambda f: f.write(b"{}"))
    with pytest.raises(files_module.UserError, match="is not a file this project wrote"):
        formats.save(mnist_mlp(), notes)
    assert notes.read_text() == '{"settings": {}, "rows": [], "dense_accuracy": 98}'



@pytest.mark.parametrize("script", SCRIPTS)
def test_speed_without_llvmlite_is_refused_before_any_work(script, tmp_path, capsys, monkeypatch):
    from pruning import kernels
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert_rejected(script, ["--speed"], "--speed times the models through the sparse kernel, which needs llvmlite",
                    tmp_path, capsys, monkeypatch)
