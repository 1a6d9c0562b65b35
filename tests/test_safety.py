"""Nothing that is not ours is ever replaced, every destination is checked before the work, and every
file we read is checked before anything of the size it claims is allocated. The runs here train on a
tiny MNIST of blank images, so each takes a second or two."""

import argparse
import functools
import json
import lzma
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import pytest
import torch
from conftest import ROOT, main_in_process, run_script

import figures
import pruning
from cli import checkpoints, destinations, options, outputs
from pruning import architecture, files, formats
from pruning.model import mnist_mlp

SCRIPTS = ["zero_pruning.py", "activation_pruning.py"]


def idx(magic, *shape):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    return header + bytes(int(torch.tensor(shape).prod()))


@pytest.fixture
def tiny_data(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in [("train", 64), ("t10k", 16)]:
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx(0x803, n, 28, 28))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(0x801, n))
    return tmp_path / "data"


def snapshot(*folders):
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(script, tiny_data, tmp_path, *args, message):
    """Run script on the tiny data with a checkpoint in tmp_path/ckpt: exit 2, one line with message,
    and every file that was there before left byte-identical."""
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    result = run_script(script, "--data-dir", tiny_data, "--epochs", "1", "--checkpoint", tmp_path / "ckpt" / "m.pt",
                        *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{script}: error:") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    after = snapshot(tmp_path)
    assert {p: after[p] for p in before} == before
    return result


def refused_in_process(script, tiny_data, tmp_path, *args, message, capsys, monkeypatch):
    """refused(), with the script's main run in this process as its command line runs it: for
    refusals made before any work, where a new process would only add PyTorch's import."""
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    code = main_in_process(monkeypatch, script, "--data-dir", tiny_data, "--epochs", "1", "--checkpoint",
                           tmp_path / "ckpt" / "m.pt", *args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith(f"{script}: error:") and message in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    after = snapshot(tmp_path)
    assert after == before  # refused before the work: every file as it was, none written


def ran(script, *args, capsys, monkeypatch):
    """Run script's main in this process, as its command line does, for a test that reads what it
    wrote (its JSON, its files): exit 0. A new process would only add PyTorch's import."""
    code = main_in_process(monkeypatch, script, *args)
    assert code == 0, capsys.readouterr().err


def user_files(tmp_path):
    """Files of a user's own, none of them written by this project."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "other.json").write_text('{"rows": [1], "mine": true}')
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (folder / "model.pt").write_bytes(b"")
    torch.save(torch.nn.Linear(2, 2), folder / "model.pt")
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, folder / "state.pt")
    with zipfile.ZipFile(folder / "archive.zip", "w") as archive:
        archive.writestr("archive/data.pkl", b"x" * 100)
    (folder / "cut.zip").write_bytes((folder / "archive.zip").read_bytes()[:60])
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("name", ["notes.txt", "other.json", "photo.png", "model.pt", "state.pt", "archive.zip",
                                  "cut.zip"])
@pytest.mark.parametrize("option", ["--json", "--checkpoint"])
def test_no_output_option_replaces_a_file_that_is_not_ours(script, name, option, tiny_data, tmp_path, capsys,
                                                          monkeypatch):
    path = user_files(tmp_path) / name
    message = "is not a file this project wrote" + ("; refusing to replace it" if option == "--checkpoint" else "")
    refused_in_process(script, tiny_data, tmp_path, option, path, message=message, capsys=capsys,
                       monkeypatch=monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_data_we_read_and_our_own_sources_are_never_outputs(script, tiny_data, tmp_path):
    refused(script, tiny_data, tmp_path, "--json", tiny_data / "MNIST" / "raw" / "train-images-idx3-ubyte",
            message="is not a file this project wrote")
    before = (ROOT / "pruning" / "model.py").read_bytes()
    refused(script, tiny_data, tmp_path, "--json", ROOT / "pruning" / "model.py",
            message="is not a file this project wrote")
    assert (ROOT / "pruning" / "model.py").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("script, names", [
    ("zero_pruning.py", ["dense.pt", "csr-threshold0.pt", "compressed-threshold0.05.bin", "zero-threshold0.onnx"]),
    ("activation_pruning.py", ["dense.pt", "activation-threshold0.pt", "compressed-threshold0.05.bin"]),
])
def test_files_of_ours_by_name_but_not_by_content_are_refused_before_the_work(script, names, tiny_data, tmp_path,
                                                                             capsys, monkeypatch):
    for i, name in enumerate(names):
        folder = tmp_path / "sd"
        folder.mkdir(exist_ok=True)
        (folder / name).write_text("the user's own file that happens to have our name")
        run = refused if i == 0 else functools.partial(refused_in_process, capsys=capsys, monkeypatch=monkeypatch)
        run(script, tiny_data, tmp_path, "--thresholds", "0", "0.05", "--bits", "5", "--onnx", "--save-dir", folder,
            message=f"{folder / name} is not a file this project wrote")
        (folder / name).unlink()
    plots = tmp_path / "pd"
    plots.mkdir()
    figure = "weight_magnitudes.png" if script == "zero_pruning.py" else "activation_pruning_accuracy.png"
    (plots / figure).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    here = functools.partial(refused_in_process, capsys=capsys, monkeypatch=monkeypatch)
    here(script, tiny_data, tmp_path, "--plot-dir", plots, message=f"{plots / figure} is not a file this project")
    (plots / figure).unlink()
    (plots / figure).mkdir()
    here(script, tiny_data, tmp_path, "--plot-dir", plots, message=f"{plots / figure} is a folder, not a file")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_run_replaces_its_own_files(script, tiny_data, tmp_path, capsys, monkeypatch):
    args = ["--data-dir", tiny_data, "--epochs", "1", "--checkpoint", tmp_path / "m.pt", "--thresholds", "0", "0.05",
            "--save-dir", tmp_path / "sd", "--plot-dir", tmp_path / "pd", "--json", tmp_path / "out.json"]
    for _ in range(2):
        ran(script, *args, capsys=capsys, monkeypatch=monkeypatch)
    assert json.loads((tmp_path / "out.json").read_text())["written_by"] == files.WRITER
    assert all(files.is_ours(p) for p in (tmp_path / "sd").iterdir())
    assert all(files.is_ours(p) for p in (tmp_path / "pd").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, message", [
    (["--save-dir", "{t}/sd", "--json", "{t}/sd/dense.pt"], "name the same file"),
    (["--plot-dir", "{t}/pd", "--json", "{t}/pd/{figure}"], "name the same file"),
    (["--hidden", "100000", "100000"], "this project builds at most 10,000,000"),
    (["--seeds", "2", "--save-dir", "{t}/seeded"], "seed-1 is a file, not a folder for seed 1's models"),
    (["--seeds", "2", "--save-dir", "{t}/linked"], "seed-1 is a link, not a folder for seed 1's models"),
    (["--checkpoint", "{t}/dangling"], "is a link to nothing, not a file"),
    (["--json", b"{t}/r\xe9sultat.json"], "is not a file this project wrote"),
])
def test_conflicts_and_impossible_requests_are_refused_before_the_work(script, args, message, tiny_data, tmp_path,
                                                                       capsys, monkeypatch):
    figure = "weight_magnitudes.png" if script == "zero_pruning.py" else "activation_pruning_accuracy.png"
    (tmp_path / "seeded").mkdir()
    (tmp_path / "seeded" / "seed-1").write_text("a file")
    (tmp_path / "linked").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked" / "seed-1").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.makedirs(os.fsencode(tmp_path) + b"/", exist_ok=True)
    with open(os.fsencode(tmp_path) + b"/r\xe9sultat.json", "w") as f:
        f.write("not ours")
    args = [os.fsdecode(a.replace(b"{t}", os.fsencode(tmp_path))) if isinstance(a, bytes)
            else a.format(t=tmp_path, figure=figure) for a in args]
    refused_in_process(script, tiny_data, tmp_path, *args, message=message, capsys=capsys, monkeypatch=monkeypatch)


@pytest.mark.slow
def test_sparsities_that_select_the_same_threshold_are_refused(tiny_data, tmp_path):
    refused("zero_pruning.py", tiny_data, tmp_path, "--sparsity", "0.0000001", "0.0000002",
            message="select the same threshold")


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--thresholds", "0", "1000", "--bits", "5"],
                                  ["--sparsity", "0.9999999", "--bits", "2"]])
def test_a_threshold_that_leaves_nothing_to_compress_is_refused_before_the_sweep(args, tiny_data, tmp_path):
    refused("zero_pruning.py", tiny_data, tmp_path, *args, message="leaves nothing to compress")


def test_a_name_with_glob_characters_touches_no_other_file(tmp_path):
    bystander = tmp_path / ".x.json.4194303.1.tmp"  # matches the temporary-file pattern of '*'
    bystander.write_text("someone's")
    files.atomic_write(tmp_path / "*", lambda f: f.write(b"{}"))
    assert bystander.read_text() == "someone's"


def test_ownership_is_checked_again_when_the_file_is_moved_into_place(tmp_path):
    path = tmp_path / "out.json"

    def write(f):  # another process puts its file there while this one writes
        path.write_text("someone else's, written meanwhile")
        f.write(b"{}")

    with pytest.raises(files.UserError, match="is not a file this project wrote"):
        files.atomic_write(path, write)
    assert path.read_text() == "someone else's, written meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.slow
def test_figures_py_never_overwrites_its_input(tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"written_by": files.WRITER, "settings": {}, "rows": [], "dense_accuracy": 1}))
    before = results.read_bytes()
    result = run_script("figures.py", "sizes", results, results)
    assert result.returncode == 2 and "name the same file" in result.stderr and results.read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT)])
def test_two_signals_close_together_end_in_one_line(first, second, tiny_data, tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "zero_pruning.py"), "--data-dir", str(tiny_data),
                                "--epochs", "1000", "--checkpoint", str(tmp_path / "m.pt")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in process.stderr:
        if line.startswith("data:"):
            break
    time.sleep(0.5)
    process.send_signal(first)
    time.sleep(0.01)
    process.send_signal(second)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + first, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("saved files are left as they were or complete")


# Hostile model files ------------------------------------------------------------------------

def compressed_file(description, body_rest=b"", prefix=None):
    text = json.dumps(description).encode()
    body = (prefix if prefix is not None else struct.pack("<I", len(text)) + text) + body_rest
    packed = lzma.compress(body, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}])
    return struct.pack("<4sBII", b"MLPZ", 2, len(packed), zlib.crc32(packed)) + packed


def hostile_files(folder):
    """{name: path} of files that claim what they do not hold, or are no files at all."""
    made = {}

    def write(name, data):
        made[name] = folder / name
        made[name].write_bytes(data)

    write("huge layer.bin", compressed_file([{"type": "Linear", "in": 100_000, "out": 100_000, "bias": True}]))
    write("many layers.bin", compressed_file([{"type": "Linear", "in": 20_000, "out": 20_000, "bias": True}] * 255))
    write("lzma bomb.bin", compressed_file(None, prefix=bytes(60 << 20)))
    write("layer bomb.bin", compressed_file([{"type": "Linear", "in": 3000, "out": 3000, "bias": True}],
                                            body_rest=bytes(60 << 20)))
    write("no layers.bin", compressed_file([]))
    model = pruning.model.mlp([3, 4, 10], inputs=[1, 2, 900])
    formats.save(model, folder / "pixels.pt")
    made["pixel past the image.pt"] = folder / "pixels.pt"
    saved = formats.torchfile.read_torch_file(folder / "pixels.pt")
    saved["architecture"] = [{"type": "Linear", "in": 30_000, "out": 30_000, "bias": True}]
    torch.save(saved, folder / "claims.pt")
    made["csr claiming 30000x30000.pt"] = folder / "claims.pt"
    saved = formats.torchfile.read_torch_file(folder / "pixels.pt")
    saved["storage"], saved["tensors"] = "csr", {"indices": torch.tensor([0, 5, 2], dtype=torch.int32),
                                                 "values": torch.ones(3)}
    torch.save(saved, folder / "inconsistent.pt")
    made["inconsistent csr.pt"] = folder / "inconsistent.pt"
    saved = formats.torchfile.read_torch_file(folder / "pixels.pt")
    del saved["architecture"]
    torch.save(saved, folder / "missing.pt")
    made["missing key.pt"] = folder / "missing.pt"
    small = pruning.model.mlp([4, 3, 2])

    def variant(name, **changes):
        formats.save(small, folder / "small.pt")
        saved = formats.torchfile.read_torch_file(folder / "small.pt")
        for key, change in changes.items():
            saved[key] = change(saved[key])
        torch.save(saved, folder / name)
        made[name] = folder / name

    variant("stride-0 indices.pt", storage=lambda _: "csr", tensors=lambda t: {
        **{k: v for k, v in t.items() if not k.endswith("weight")},
        "indices": torch.zeros(1, dtype=torch.int32).expand(400_000_000), "values": torch.ones(20)})
    variant("large about.pt", about=lambda _: {"notes": ["x" * 10] * 600_000})  # its description over 1 MiB
    variant("version as text.pt", version=lambda _: "1")
    for kind, make in [("qint8", lambda w: torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)),
                       ("meta", lambda w: w.to("meta")), ("sparse", lambda w: w.to_sparse())]:
        variant(f"{kind} tensor.pt", tensors=lambda t, make=make: {**t, "2.weight": make(t["2.weight"])})
    os.mkfifo(folder / "fifo")
    made["fifo"] = folder / "fifo"
    made["/dev/zero"] = "/dev/zero"
    made["folder"] = folder
    return made


def peak_rss_reset():
    """Start the process's peak resident memory (VmHWM) afresh, as Linux allows since 4.0."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) // 1024


def test_every_hostile_model_file_is_refused_in_one_line_within_500_mb(tmp_path):
    """In this process: its peak memory is started afresh before the loads, and read after them."""
    paths = hostile_files(tmp_path)
    peak_rss_reset()  # the peak is now the memory the process holds
    before = peak_rss_mb()
    refused = {}
    for name, path in paths.items():
        with pytest.raises(pruning.UserError) as error:
            pruning.load(path)
        refused[name] = str(error.value)
    growth_mb = peak_rss_mb() - before
    assert all("\n" not in message for message in refused.values()), refused
    assert growth_mb < 500, (growth_mb, refused)


def test_an_abandoned_probe_file_is_removed_by_the_next_check(tmp_path):
    probe = tmp_path / ".out.json.4194303.1.tmp"
    probe.write_bytes(b"")
    destinations.check_file_destination("--json", tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_names_of_any_bytes_and_any_length_are_handled(tiny_data, tmp_path):
    result = run_script("zero_pruning.py", "--data-dir", tmp_path / ("d" * 300), "--checkpoint", tmp_path / "m.pt")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("zero_pruning.py: error: ")
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/mod\xe8le")
    result = run_script("zero_pruning.py", "--data-dir", tiny_data, "--epochs", "1", "--thresholds", "0",
                        "--checkpoint", odd + ".pt", "--json", odd + ".json", "--save-dir", odd)
    assert result.returncode == 0, result.stderr
    assert json.loads(open(os.fsencode(odd + ".json"), "rb").read())["rows"][0]["threshold"] == 0


def test_a_run_forgets_its_folders_when_it_ends(tmp_path, monkeypatch):
    """A later run in the same process (as the tests run them) leaves alone a folder of the same
    name that another process made since, in the same second."""
    monkeypatch.setattr(outputs, "ROOT", tmp_path)
    first = outputs.run_folder("zero_pruning.py")
    outputs.remove_empty_folders()
    assert not first.exists()
    first.mkdir()  # another process's run
    outputs.remove_empty_folders()  # the end of this process's next run, which made no folder
    assert first.is_dir()


@pytest.mark.parametrize("make", [lambda p: p.write_text("a file"), lambda p: p.symlink_to(p.parent / "nowhere")])
def test_a_checkpoints_folder_that_is_a_file_or_a_dangling_link_is_one_line(make, tmp_path, capsys, monkeypatch):
    """The script's main run in this process with the project's folder at tmp_path."""
    monkeypatch.setattr(checkpoints, "ROOT", tmp_path)
    monkeypatch.setattr(outputs, "ROOT", tmp_path)
    make(tmp_path / "checkpoints")
    code = main_in_process(monkeypatch, "zero_pruning.py", "--data-dir", tmp_path / "none")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "checkpoints" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_validation_and_control_are_reported_under_their_names(tiny_data, tmp_path):
    result = run_script("zero_pruning.py", "--data-dir", tiny_data, "--epochs", "1", "--checkpoint", tmp_path / "m.pt",
                        "--sparsity", "0.5", "--steps", "2", "--finetune-epochs", "1", "--validation", "16",
                        "--control", "--json", tmp_path / "r.json", "--save-dir", tmp_path / "sd")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert {"dense_accuracy", "validation_dense_accuracy", "control_accuracy", "validation_control_accuracy",
            "control_epochs"} <= results.keys() and "accuracy_std" not in results
    assert results["control_epochs"] == 1 + 1 + 5  # dense, one step of 1, the last of 5
    row = results["rows"][0]
    assert {"validation_accuracy", "validation_finetuned_accuracy"} <= row.keys()
    assert "trained 7 epochs in all, as long as a pruned model" in result.stdout
    assert "on the held-out validation images" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script, target, extra, first, step, final, cut", [
    ("zero_pruning.py", "--sparsity", (), 10, 4, 30,
     {"criterion": "magnitude", "variational_dropout": 10.0, "input_dropout": 0.0}),
    ("activation_pruning.py", "--reduction", (), 10, 6, 30,
     {"criterion": "saliency", "group_lasso": 0.01, "input_dropout": 0.0}),
    ("activation_pruning.py", "--reduction", ("--prune-inputs",), 10, 6, 30,
     {"criterion": "saliency", "group_lasso": 0.01, "input_dropout": 0.1}),
    ("activation_pruning.py", "--reduction",
     ("--group-lasso", "0", "--criterion", "contribution", "--prune-inputs", "--input-dropout", "0"), 0, 6, 30,
     {"criterion": "contribution", "group_lasso": 0.0, "input_dropout": 0.0})])
def test_steps_without_finetune_epochs_fine_tune_each_scripts_defaults(script, target, extra, first, step, final, cut,
                                                                        tiny_data, tmp_path, capsys, monkeypatch):
    ran(script, "--data-dir", tiny_data, "--epochs", "1", "--checkpoint", tmp_path / "m.pt", target, "0.5", "--steps",
        "3", *extra, "--control", "--json", tmp_path / "r.json", "--save-dir", tmp_path / "sd", capsys=capsys,
        monkeypatch=monkeypatch)
    results = json.loads((tmp_path / "r.json").read_text())
    assert (results["settings"]["finetune_epochs"], results["settings"]["final_epochs"]) == (step, final)
    assert {k: results["settings"][k] for k in cut} == cut  # what learns and ranks the cut, unless given
    assert results["control_epochs"] == 1 + first + 2 * step + final  # first: variational dropout's or group lasso's


@pytest.mark.slow
def test_group_lasso_training_counts_in_the_control_and_the_cut_starts_from_it(tiny_data, tmp_path, capsys,
                                                                               monkeypatch):
    common = ("--data-dir", tiny_data, "--epochs", "1", "--checkpoint", tmp_path / "m.pt", "--reduction", "0.5",
              "--steps", "2", "--finetune-epochs", "1", "--final-epochs", "1", "--prune-inputs", "--control")
    runs = {}
    for name, extra in (("plain", ()), ("lasso", ("--group-lasso", "0.01", "--group-lasso-epochs", "2"))):
        ran("activation_pruning.py", *common, *extra, "--json", tmp_path / f"{name}.json", "--save-dir",
            tmp_path / name, capsys=capsys, monkeypatch=monkeypatch)
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert runs["plain"]["control_epochs"] == 1 + 1 + 1 and runs["lasso"]["control_epochs"] == 1 + 2 + 1 + 1
    plain, lasso = runs["plain"]["rows"][0], runs["lasso"]["rows"][0]
    assert plain["new_params"] == lasso["new_params"]  # the same size, cut from another model
    weights = [pruning.load(tmp_path / name / "activation-reduction0.5.pt")[-1].weight for name in runs]
    assert weights[0].shape == weights[1].shape and not torch.equal(*weights)


@pytest.mark.slow
def test_variational_dropout_counts_in_the_control_and_pruning_in_steps_starts_from_it(tiny_data, tmp_path, capsys,
                                                                                       monkeypatch):
    common = ("--data-dir", tiny_data, "--epochs", "1", "--checkpoint", tmp_path / "m.pt", "--sparsity", "0.5",
              "--steps", "2", "--control")
    runs = {}
    for name, extra in (("plain", ("--finetune-epochs", "1", "--final-epochs", "1")),
                        ("dropout", ("--finetune-epochs", "1", "--final-epochs", "1", "--variational-dropout", "10",
                                     "--variational-dropout-epochs", "2")),
                        ("off", ("--final-epochs", "1", "--variational-dropout", "0"))):
        ran("zero_pruning.py", *common, *extra, "--json", tmp_path / f"{name}.json", "--save-dir", tmp_path / name,
            capsys=capsys, monkeypatch=monkeypatch)
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert [runs[name]["control_epochs"] for name in runs] == [1 + 1 + 1, 1 + 2 + 1 + 1, 1 + 4 + 1]
    weights = [pruning.load(tmp_path / name / "csr-sparsity0.5.pt")[-1].weight for name in ("plain", "dropout")]
    assert not torch.equal(*(w.to_dense() for w in weights))


@pytest.mark.slow
def test_bf16_trains_a_model_of_its_own_and_leaves_the_fp32_checkpoints_name_alone(tiny_data, tmp_path, capsys,
                                                                                   monkeypatch):
    args = ("--data-dir", tiny_data, "--epochs", "1", "--thresholds", "0", "--quiet")
    for extra in ((), ("--bf16",)):
        ran("zero_pruning.py", *args, *extra, "--checkpoint", tmp_path / "m.pt", "--json", tmp_path / "r.json",
            capsys=capsys, monkeypatch=monkeypatch)
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["bf16"] is True
    assert formats.load(tmp_path / "m.pt", with_about=True)[1]["config"]["bf16"] is True  # retrained, not reused
    fp32 = argparse.Namespace(model="mlp", hidden=[512, 256, 128], epochs=5, lr=1e-3, batch_size=128, seed=0,
                              validation=0, bf16=False, shift=0, checkpoint=None)
    name = checkpoints.checkpoint_path(fp32, checkpoints.training_config(fp32)).name
    assert name == "mlp-e58641c41030.pt"  # as before --bf16 and --shift existed


@pytest.mark.slow
def test_shift_trains_a_model_of_its_own_and_distils_from_it(tiny_data, tmp_path, capsys, monkeypatch):
    args = ("--data-dir", tiny_data, "--epochs", "1", "--reduction", "0.5", "--steps", "2", "--distill", "--quiet",
            "--checkpoint", tmp_path / "m.pt", "--json", tmp_path / "r.json", "--control")
    ran("activation_pruning.py", *args, "--shift", "2", capsys=capsys, monkeypatch=monkeypatch)
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["shift"] == 2
    for name in ("m.pt", "m-control.pt"):
        assert formats.load(tmp_path / name, with_about=True)[1]["config"]["shift"] == 2


# Arguments and files that once got through -------------------------------------------------------

def tiny_description(**changes):
    layer = {"type": "Linear", "in": 4, "out": 2, "bias": True, **changes}
    return [layer]


@pytest.mark.parametrize("changes, message", [
    ({"bias": float("nan")}, "impossible bias: nan"), ({"bias": -3}, "impossible bias: -3"),
    ({"bias": [1] * 3_000_000}, "impossible bias: [1, 1, 1"), ({"type": []}, "of no type"),
    ({"in": "4"}, "impossible in: '4'"), ({"extra": 1}, "does not hold its fields"),
    ({"reads": [0]}, "reads impossible nodes: [0]"), ({"reads": [-1, -1]}, "reads impossible nodes"),
    ({"reads": "x" * 1000}, "reads impossible nodes: 'xxxx"),
])
def test_every_field_of_an_architecture_is_checked_before_counting(changes, message):
    with pytest.raises(architecture.BadArchitecture, match=re.escape(message)) as e:
        architecture.check(tiny_description(**changes))
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("layer", [
    {"type": "BatchNorm1d", "features": 4, "eps": -1.0, "momentum": 0.1, "affine": True, "track": True},
    {"type": "BatchNorm1d", "features": 4, "eps": 1e-5, "momentum": float("inf"), "affine": True, "track": True},
    {"type": "Normalize", "mean": 0.1, "std": 0.0, "shape": [4]},
    {"type": "Normalize", "mean": "nan", "std": 1.0, "shape": [4]},
    {"type": "Dropout", "p": 1.5},
])
def test_normalisations_and_statistics_must_be_finite_numbers(layer):
    with pytest.raises(architecture.BadArchitecture, match="impossible"):
        architecture.check([layer, *tiny_description()])


def test_a_model_with_non_finite_statistics_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    model[1].running_var.fill_(float("nan"))
    formats.save(model, tmp_path / "m.pt")
    with pytest.raises(files.UserError, match="statistics that are not finite"):
        formats.load(tmp_path / "m.pt")


def test_the_library_checks_its_arguments_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = mnist_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for steps in (0, -1, 10 ** 9, 2.0):
        with pytest.raises(ValueError, match="steps must be a whole number"):
            pruning.zero_prune(model, 0.5, steps=steps)
        with pytest.raises(ValueError, match="steps must be a whole number"):
            pruning.activation_prune(model, torch.rand(8, 784), 0.5, steps=steps)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    same = pruning.activation_prune(model, torch.rand(8, 784), 0.0)
    assert pruning.model.widths(same) == (784, 512, 256, 128, 10)  # reduction 0 removes nothing
    with pytest.raises(ValueError, match="100 images and 99 labels"):
        pruning.train(model, (torch.rand(100, 784), torch.zeros(99, dtype=torch.long)), epochs=1)
    with pytest.raises(ValueError, match="input_dropout must be from 0 to below 1"):
        pruning.train(model, (torch.rand(8, 784), torch.zeros(8, dtype=torch.long)), epochs=1, input_dropout=1.0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("norm", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d])
def test_a_batchnorm_model_in_training_mode_comes_out_of_activation_prune_as_it_was(norm):
    torch.manual_seed(0)
    if norm is torch.nn.BatchNorm1d:
        model = torch.nn.Sequential(torch.nn.Linear(784, 32), norm(32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        x = torch.rand(64, 784)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), norm(8), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 26 * 26, 10))
        x = torch.rand(64, 1, 28, 28)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    smaller = pruning.activation_prune(model, x, 0.5)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # statistics not updated
    assert pruning.count_params(smaller) <= 0.5 * pruning.count_params(model) and smaller.training


# Failures said in one line, with the user's model and files as they were -------------------

def in_subprocess(code, *args):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_a_full_disk_on_a_model_file_is_one_line_and_leaves_nothing(tmp_path):
    """In this process: a disk that fills at 100 kB is a file size limit, its signal ignored, so that
    a write fails as on a full disk."""
    model = pruning.mnist_mlp()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(pruning.UserError) as error:
            pruning.save(model, tmp_path / "m.pt")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert str(error.value).startswith("cannot write") and "File too large" in str(error.value)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_during_an_export_takes_effect_when_it_ends():
    code = ("import os, signal\n"
            "from cli import startup\n"
            "with startup.signals_deferred():\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    print('FINISHED THE EXPORT', flush=True)\n"
            "print('NOT REACHED')\n")
    result = in_subprocess(code)
    assert "FINISHED THE EXPORT" in result.stdout and "NOT REACHED" not in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "KeyboardInterrupt"


def test_a_cleanup_that_fails_is_not_a_second_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(files.os, "link", refuse)  # a folder that turned read-only mid-write
    monkeypatch.setattr(files.Path, "unlink", refuse)
    with pytest.raises(files.UserError, match="cannot write .*m.pt: Permission denied"):
        formats.save(mnist_mlp([784, 10]), tmp_path / "m.pt")


def test_a_long_legal_name_saves_and_a_folder_named_like_a_temporary_is_passed_by(tmp_path):
    model = mnist_mlp([784, 10])
    for name in ("m" * 252 + ".pt", "r.pt"):
        for n in range(files._written + 1, files._written + 4):  # folders where the next temporaries would go
            (tmp_path / files.TEMPORARY.format(name=name[:files.NAME_KEPT], pid=os.getpid(), n=n)).mkdir()
        formats.save(model, tmp_path / name)
        assert torch.equal(formats.load(tmp_path / name)[1].weight, model[1].weight)
    assert sum(p.is_dir() for p in tmp_path.iterdir()) == 6  # not ours: left where they were


def test_a_path_or_value_in_an_error_is_one_line_of_readable_length():
    assert files.shown("a\nb\rc") == "a\\nb\\rc"
    assert len(files.shown("x" * 100_000)) < 210
    with pytest.raises(architecture.BadArchitecture) as e:
        architecture.check(tiny_description(out=[7] * 3_000_000))
    assert len(str(e.value)) < 200
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(architecture.BadArchitecture, match="impossible in: a value nested too deeply"):
        architecture.check(tiny_description(**{"in": deep}))


def test_zero_prune_that_fails_leaves_the_model_as_it_was_without_masks():
    torch.manual_seed(0)
    model = mnist_mlp([784, 16, 10])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def saliency(m):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a saliency that fails on the second step")
        return [layer.weight.detach().abs() for layer in pruning.weighted(m)]
    with pytest.raises(RuntimeError, match="second step"):
        pruning.zero_prune(model, 0.9, steps=3, saliency=saliency)
    assert model.state_dict().keys() == before.keys()  # no weight_orig, no weight_mask
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_a_model_still_carrying_masks_saves_as_its_masked_weights(kind, tmp_path):
    torch.manual_seed(0)
    model = pruning.hold_below(mnist_mlp([784, 16, 10]), 0.02)
    formats.save(model, tmp_path / "m.pt", kind)
    loaded = formats.load(tmp_path / "m.pt")
    x = torch.rand(5, 784)
    assert torch.equal(loaded(x), model(x).detach())
    assert (loaded[1].weight == 0).sum() == (model[1].weight == 0).sum() > 0


def test_training_that_diverges_gives_the_model_back_as_it_was():
    torch.manual_seed(0)
    model = mnist_mlp([784, 16, 10])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(64, 784) * 1e30, torch.zeros(64, dtype=torch.long)
    with pytest.raises(pruning.training.Diverged, match="as it was"):
        pruning.train(model, (x, y), epochs=1, lr=1e30)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_runs_the_machine_cannot_hold_are_refused_before_training():
    def args(**changes):
        return argparse.Namespace(**{"model": "mlp", "hidden": [512, 256, 128], "batch_size": 128, "threads": 2,
                                     **changes})
    with pytest.raises(files.UserError, match="GiB of memory to train; this machine has"):
        options.check_memory(args(hidden=[2, 100_000], batch_size=60_000))
    options.check_memory(args())
    with pytest.raises(files.UserError, match="--threads 1024: this machine has .* cores; give at most"):
        options.check_threads(args(threads=1024))
    with pytest.raises(files.UserError, match="--thresholds: 101 values; give at most 100"):
        options.check_labels("--thresholds", [i / 1000 for i in range(101)])


@pytest.mark.slow
def test_a_run_that_would_not_fit_in_memory_is_refused_by_the_script(tiny_data, tmp_path):
    refused("zero_pruning.py", tiny_data, tmp_path, "--hidden", "2", "100000", "--batch-size", "60000",
            message="GiB of memory to train")


def test_a_checkpoint_option_at_a_result_of_ours_is_refused_not_replaced(tiny_data, tmp_path, capsys, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    model = pruning.hold_below(mnist_mlp(), 0.05)
    formats.save(model, tmp_path / "ckpt" / "m.pt", "csr")
    refused_in_process("zero_pruning.py", tiny_data, tmp_path, message="saved as a result, not a trained checkpoint",
                       capsys=capsys, monkeypatch=monkeypatch)


@pytest.mark.slow
def test_a_read_only_cache_that_holds_the_model_is_used(tiny_data, tmp_path, monkeypatch):
    checkpoint = tmp_path / "m.pt"
    args = ["--data-dir", str(tiny_data), "--epochs", "1", "--thresholds", "0", "--checkpoint", str(checkpoint),
            "--save-dir", str(tmp_path / "out")]
    assert run_script("zero_pruning.py", *args).returncode == 0
    code = ("import sys, runpy\n"
            "from cli import destinations\n"
            "def read_only(path):\n"
            "    if path.name == 'm.pt':\n"
            "        raise destinations.UserError(f'cannot write {path}: Read-only file system')\n"
            "destinations.probe_writable = read_only\n"
            "sys.argv = ['zero_pruning.py', *sys.argv[1:]]\n"
            "runpy.run_path('zero_pruning.py', run_name='__main__')\n")
    result = in_subprocess(code, *args)
    assert result.returncode == 0, result.stderr
    assert f"model: loaded {checkpoint}" in result.stderr


def test_results_nested_too_deeply_or_of_other_types_are_one_line(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert not files.is_ours(deep)
    with pytest.raises(files.UserError, match="nested too deeply"):
        figures.read(deep)
    row = {k: 1 for k in ("accuracy", "zero_percentage", "dense_bytes", "csr_bytes", "quantized_accuracy",
                          "compressed_bytes")}
    good = {"settings": {"bits": 5, "hidden": [1]}, "dense_accuracy": 98.0, "rows": [row]}
    assert figures.from_zero_pruning_with_bits(good)
    assert not figures.from_zero_pruning_with_bits({**good, "settings": {"bits": "x", "hidden": [1]}})
    assert not figures.from_zero_pruning_with_bits({**good, "rows": [{**row, "csr_bytes": "many"}]})
