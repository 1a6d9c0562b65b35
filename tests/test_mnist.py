"""End to end on real MNIST: both scripts as a user runs them, their saved models, their
determinism, and what Ctrl-C and concurrent runs leave on disk."""

import errno
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, main_in_process, run_script, script_command

import activation_pruning as ap
import pruning
import zero_pruning as zp
from cli import bars, recipe
from pruning import data as mnist
from pruning import files, formats, surgery, training
from pruning.formats import torchfile
from pruning.model import count_params, kept_inputs, mlp

pytestmark = [pytest.mark.usefixtures("mnist_dir"), pytest.mark.slow]
TIMINGS = {"inference_time_s", "dense_inference_time_s"}


def load(checkpoint):
    """The model in checkpoint, which must be complete and hold its training settings."""
    model, about = formats.load(checkpoint, with_about=True)
    assert about["config"]["recipe"] == training.RECIPE
    return model


def assert_fast_predicts_as_loaded(path, images, batch=32):
    """pruning.for_inference of the file's model predicts every image as the loaded model does."""
    loaded = pruning.load(path)
    fast = pruning.for_inference(loaded, batch)
    with torch.no_grad():
        expected = torch.cat([loaded(x) for x in images.split(500)])
        got = torch.cat([fast(x) for x in images.split(500)])
    assert torch.equal(got.argmax(1), expected.argmax(1)), path
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), path


def header(table):
    return [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]


def run_json(script, tmp_path, *args, **kwargs):
    """Run script with --json; returns (results, stdout, stderr)."""
    out = tmp_path / f"{script}.json"
    result = run_script(script, *args, "--json", out, **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout, result.stderr


def test_zero_pruning_default_sweep(checkpoint, tmp_path):
    results, stdout, stderr = run_json("zero_pruning.py", tmp_path, "--checkpoint", checkpoint, "--save-dir", tmp_path)
    rows = results["rows"]
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~files.umask() for p in tmp_path.iterdir())  # not 0600
    assert [r["threshold"] for r in rows] == zp.THRESHOLDS
    assert rows[0]["accuracy"] >= 97.5 and rows[0]["zeroed_params"] == 0
    assert all(r["original_params"] == 566_528 for r in rows)
    assert [r["zeroed_params"] for r in rows] == sorted(r["zeroed_params"] for r in rows)
    assert rows[-1]["zero_percentage"] > 90
    for r in rows:
        assert r["zero_percentage"] == pytest.approx(100 * r["zeroed_params"] / 566_528)
        assert r["csr_bytes"] == (tmp_path / f"csr-threshold{r['threshold']:.4g}.pt").stat().st_size
        assert r["csr_bytes_needed"] <= r["csr_bytes"] <= 1.10 * r["csr_bytes_needed"]
    assert rows[0]["dense_bytes"] == (tmp_path / "dense.pt").stat().st_size
    assert header(stdout) == ["Threshold", "Accuracy", "Original Params", "Zeroed Params", "Zero Percentage",
                              "Dense File (B)", "CSR File (B)"]
    assert "Memory impact: the sparsest model within half a point of the dense one: at threshold 0.03," in stdout
    assert "The sparsest overall: at threshold 0.1," in stdout
    assert f"Dense model: {results['dense_accuracy']:.2f}% test accuracy." in stdout
    assert f"model: loaded {checkpoint} (test accuracy {rows[0]['accuracy']:.2f}%)" in stderr

    # every saved file loads back into a model that takes raw images and scores as its row says
    model = load(checkpoint)
    _, test = mnist.load(mnist.data_root())
    images = (test[0].view(-1, 28, 28), test[1])
    pruned = surgery.make_permanent(surgery.hold_below(model, 0.04))
    loaded = pruning.load(tmp_path / "csr-threshold0.04.pt")
    assert torch.equal(training.predict(loaded, test[0]), training.predict(pruned, test[0]))
    assert [training.accuracy(pruning.load(tmp_path / f"csr-threshold{r['threshold']:.4g}.pt"), images)
            for r in rows] == [r["accuracy"] for r in rows]
    for name in ["dense.pt"] + [f"csr-threshold{r['threshold']:.4g}.pt" for r in rows]:
        assert_fast_predicts_as_loaded(tmp_path / name, test[0])
    assert training.accuracy(pruning.load(tmp_path / "dense.pt"), images) == results["dense_accuracy"]


def test_activation_pruning_default_sweep(checkpoint, tmp_path):
    results, stdout, stderr = run_json("activation_pruning.py", tmp_path, "--checkpoint", checkpoint,
                                       "--save-dir", tmp_path)
    rows = results["rows"]
    assert [r["threshold"] for r in rows] == ap.THRESHOLDS
    assert rows[0]["new_params"] == rows[0]["original_params"] == 567_434
    assert rows[0]["hidden_widths"] == [512, 256, 128] and rows[0]["size_reduction"] == 0
    assert [r["new_params"] for r in rows] == sorted((r["new_params"] for r in rows), reverse=True)
    assert all(r["inference_time_s"] > 0 for r in rows)
    assert header(stdout) == ["Threshold", "Accuracy", "Original Params", "New Params", "Hidden Widths",
                              "Inference Time (s)", "Size Reduction"]
    assert " 512-256-128 |" in stdout

    model = load(checkpoint)
    _, test = mnist.load(mnist.data_root())
    assert rows[0]["accuracy"] == training.accuracy(model, test)  # threshold 0: the unchanged model
    for r in rows:  # each saved model rebuilds itself, smaller, and reads raw images of any shape
        smaller = pruning.load(tmp_path / f"activation-threshold{r['threshold']:.4g}.pt")
        assert count_params(smaller) == r["new_params"]
        assert training.accuracy(smaller, (test[0].view(-1, 1, 28, 28), test[1])) == r["accuracy"]
    for r in (rows[0], rows[-1]):  # the kernel's plan for the largest and the smallest model
        assert_fast_predicts_as_loaded(tmp_path / f"activation-threshold{r['threshold']:.4g}.pt", test[0])
    assert all(r["dense_inference_time_s"] > 0 for r in rows)
    assert "Times: the 10,000 test images in one batch, each row the median of 5 rounds taken in turn with the " \
           "dense model" in stdout


@pytest.fixture(scope="module")
def dense_accuracy(checkpoint):
    """Test accuracy of the trained, unpruned model: the baseline of the fine-tuning bars."""
    return training.accuracy(load(checkpoint), mnist.load(mnist.data_root())[1])


def test_fine_tuning_after_one_cut_to_95_percent_zeros_recovers_and_speed_is_timed(checkpoint, small_mnist,
                                                                                    tmp_path, json_of):
    """On a slice of MNIST (the bar on all of it, within half a point of dense: bench.py --bars)."""
    results, stdout = json_of("zero_pruning.py", tmp_path, "--checkpoint", checkpoint, "--data-dir", small_mnist,
                                  "--sparsity", "0.95", "--finetune-epochs", "1", "--speed")
    (row,) = results["rows"]
    assert row["zero_percentage"] >= 95
    assert row["finetuned_accuracy"] > row["accuracy"]
    assert "Fine-tuned" in stdout
    # --speed: for_inference's speed-ups by batch size beside the arithmetic's, as timed (not asserted: bench.py)
    assert row["speedup"].keys() == {"1", "32", "10000"} and all(v > 0 for v in row["speedup"].values())
    assert row["flops_ratio"] == pytest.approx(566_528 / (566_528 - row["zeroed_params"]), rel=1e-3)
    assert "Speed-up (batch 1 / 32 / 10,000)" in header(stdout) and "pruning.for_inference(model, batch)" in stdout


def test_one_step_is_the_one_shot_path(checkpoint, small_mnist, tmp_path, json_of):
    args = ("--checkpoint", checkpoint, "--data-dir", small_mnist, "--sparsity", "0.9", "--finetune-epochs", "1")
    one_shot = json_of("zero_pruning.py", tmp_path, *args)[0]
    one_step = json_of("zero_pruning.py", tmp_path, *args, "--steps", "1")[0]
    assert one_step["rows"] == one_shot["rows"]


def test_pruning_by_saliency_reaches_the_sparsity_and_saves_what_it_measured(checkpoint, small_mnist, tmp_path,
                                                                             json_of):
    """On a slice of MNIST (the bar on all of it, within half a point of dense: bench.py --bars)."""
    results, stdout = json_of("zero_pruning.py", tmp_path, "--checkpoint", checkpoint, "--data-dir", small_mnist,
                                  "--sparsity", "0.95", "--steps", "2", "--finetune-epochs", "1", "--final-epochs", "1",
                                  "--criterion", "saliency", "--save-dir", tmp_path)
    (row,) = results["rows"]
    assert results["settings"]["criterion"] == "saliency"
    assert row["zero_percentage"] >= 95 and "threshold" not in row
    assert "Threshold" not in header(stdout)
    saved = pruning.load(tmp_path / "csr-sparsity0.95.pt")
    assert pruning.count_zeros(saved) == row["zeroed_params"]
    assert training.accuracy(saved, mnist.load(small_mnist)[1]) == row["finetuned_accuracy"] > 90


def test_variational_dropout_zeroes_most_weights_by_itself_and_pruning_in_steps_starts_from_it(
        checkpoint, dense_accuracy, small_mnist, tmp_path):
    train_data, test = mnist.load(mnist.data_root())
    model = load(checkpoint)
    pruning.sparse_variational_dropout(model, train_data, epochs=1, strength=1.0)  # the variational bound
    assert pruning.count_zeros(model) >= 0.85 * pruning.count_weights(model)  # about 93% here
    assert training.accuracy(model, test) >= dense_accuracy - 1.5
    results, _, stderr = run_json("zero_pruning.py", tmp_path, "--checkpoint", checkpoint, "--sparsity", "0.985",
                                  "--steps", "2", "--finetune-epochs", "1", "--final-epochs", "2", "--distill",
                                  "--variational-dropout", "1", "--variational-dropout-epochs", "1",
                                  "--data-dir", small_mnist, "--save-dir", tmp_path)
    (row,) = results["rows"]
    assert "variational dropout: epoch 1/1 done" in stderr
    assert row["zero_percentage"] >= 98.5
    assert row["finetuned_accuracy"] > 70  # 3,000 training images; on all of MNIST (bench.py --bars) at least 96%


def test_pruning_in_steps_writes_a_5_bit_file_100_times_smaller_that_loads_as_measured(small_mnist, tmp_path, json_of):
    """The README's 98.5% command on a slice of MNIST, fewer steps: its accuracy bars are
    bench.py --bars' (cli/bars.py), its files and figures are checked here."""
    results, stdout = json_of("zero_pruning.py", tmp_path, "--data-dir", small_mnist, "--checkpoint",
                                  tmp_path / "m.pt", "--sparsity", "0.985", "--steps", "2", "--finetune-epochs", "1",
                                  "--distill", "--bits", "5", "--save-dir", tmp_path)
    (row,) = results["rows"]
    assert row["zero_percentage"] >= 98.5
    path = tmp_path / "compressed-sparsity0.985.bin"
    assert row["compressed_bytes"] == path.stat().st_size <= bars.DENSE_FILE_BYTES / 100
    assert header(stdout)[-4:] == ["Quantized", "Q. Fine-tuned", "Compressed File (B)", "x Smaller"]
    test = mnist.load(small_mnist)[1]
    assert training.accuracy(pruning.load(path), test) == row["quantized_finetuned_accuracy"]
    assert training.accuracy(pruning.load(tmp_path / "csr-sparsity0.985.pt"), test) == row["finetuned_accuracy"]


def test_lenet_300_100_is_the_hidden_option_and_prunes_to_98_percent_zeros(small_mnist, tmp_path, json_of):
    results, _ = json_of("zero_pruning.py", tmp_path, "--data-dir", small_mnist, "--checkpoint",
                             tmp_path / "lenet.pt", "--hidden", "300", "100", "--sparsity", "0.98", "--steps", "2",
                             "--finetune-epochs", "1", "--distill")
    (row,) = results["rows"]
    assert row["original_params"] == 784 * 300 + 300 * 100 + 100 * 10
    assert row["zero_percentage"] >= 98
    assert row["finetuned_accuracy"] > 80  # 3,000 training images; the bar on all of MNIST is bench.py --bars'


def test_activation_pruning_at_80_percent_fewer_params_is_fine_tuned_compensated_and_set_beside_baselines(
        checkpoint, small_mnist, tmp_path, json_of):
    """On a slice of MNIST (the bar on all of it, within half a point of dense: bench.py --bars)."""
    results, stdout = json_of("activation_pruning.py", tmp_path, "--checkpoint", checkpoint, "--thresholds",
                                  "0.9", "--finetune-epochs", "1", "--bias-compensation", "--baselines",
                                  "--data-dir", small_mnist)
    (row,) = results["rows"]
    assert row["size_reduction"] >= 80
    assert row["compensated_accuracy"] > row["accuracy"] and row["finetuned_accuracy"] > 90
    assert "Bias-compensated" in stdout and "Fine-tuned" in stdout
    assert 0 < row["random_accuracy"] < 100 and 0 < row["layerwise_accuracy"] < 100  # the same widths, not tuned
    assert header(stdout)[-2:] == ["Random", "Layer-wise"] and "Random and Layer-wise (--baselines)" in stdout


def test_activation_pruning_by_saliency_removes_80_percent_of_parameters_and_saves_what_it_measured(
        checkpoint, small_mnist, tmp_path, json_of):
    """On a slice of MNIST (the bar on all of it, within half a point of dense: bench.py --bars)."""
    results, stdout = json_of("activation_pruning.py", tmp_path, "--checkpoint", checkpoint, "--reduction", "0.8",
                                  "--steps", "2", "--finetune-epochs", "1", "--final-epochs", "1", "--distill",
                                  "--prune-inputs", "--criterion", "saliency", "--data-dir", small_mnist,
                                  "--save-dir", tmp_path)
    (row,) = results["rows"]
    assert results["settings"]["criterion"] == "saliency"
    assert row["size_reduction"] >= 80
    saved = pruning.load(tmp_path / "activation-reduction0.8.pt")
    assert count_params(saved) == row["new_params"]
    assert training.accuracy(saved, mnist.load(small_mnist)[1]) == row["finetuned_accuracy"] > 90


def test_activation_pruning_in_steps_removes_95_percent_of_parameters_and_pixels(small_mnist, tmp_path, json_of):
    """The README's 95% command on a slice of MNIST, fewer steps: its accuracy bars (two seeds) are
    bench.py --bars', its widths, pixels and file are checked here."""
    results, stdout = json_of("activation_pruning.py", tmp_path, "--data-dir", small_mnist, "--checkpoint",
                                  tmp_path / "m.pt", "--reduction", "0.95", "--steps", "2", "--finetune-epochs", "1",
                                  "--distill", "--prune-inputs", "--save-dir", tmp_path)
    (row,) = results["rows"]
    assert row["new_params"] <= 28_371 and row["size_reduction"] >= 95
    assert row["input_width"] == len(row["kept_pixels"]) < 784
    assert header(stdout)[:7] == ["Reduction", "Accuracy", "Fine-tuned", "Original Params", "New Params",
                                  "Input Pixels", "Hidden Widths"]

    # the saved model holds its pixels and its normalisation, and classifies whole raw images
    model = pruning.load(tmp_path / "activation-reduction0.95.pt")
    assert count_params(model) == row["new_params"]
    assert kept_inputs(model).tolist() == row["kept_pixels"]
    x, y = mnist.load(small_mnist)[1]
    assert training.accuracy(model, (x.view(-1, 28, 28), y)) == row["finetuned_accuracy"] > 70


def test_same_seed_same_results(small_mnist, tmp_path, json_of):
    """Two trainings from scratch with the same settings give the same accuracies and counts."""
    runs = []
    for i in range(2):
        results = json_of("zero_pruning.py", tmp_path, "--checkpoint", tmp_path / f"m{i}.pt", "--epochs", "1",
                           "--thresholds", "0", "0.05", "--finetune-epochs", "1", "--data-dir", small_mnist)[0]
        runs.append(results["rows"])
    runs.append(json_of("activation_pruning.py", tmp_path, "--checkpoint", tmp_path / "m0.pt", "--epochs", "1",
                         "--thresholds", "0", "0.5", "--data-dir", small_mnist)[0]["rows"])
    runs.append(json_of("activation_pruning.py", tmp_path, "--checkpoint", tmp_path / "m1.pt", "--epochs", "1",
                         "--thresholds", "0", "0.5", "--data-dir", small_mnist)[0]["rows"])
    assert runs[0] == runs[1]
    strip = [[{k: v for k, v in r.items() if k not in TIMINGS} for r in rows] for rows in runs[2:]]
    assert strip[0] == strip[1]
    first, second = (formats.torchfile.read_torch_file(tmp_path / f"m{i}.pt")["tensors"] for i in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("bad", ["other settings", "not finite"])
def test_an_unusable_checkpoint_of_ours_is_reported_and_replaced(bad, checkpoint, small_mnist, tmp_path):
    path = tmp_path / "mlp.pt"
    saved = formats.torchfile.read_torch_file(checkpoint)
    model, config = torchfile.from_tensors(saved), {**saved["about"]["config"], "epochs": 1}
    if bad == "not finite":
        saved["tensors"]["1.weight"][0, 0] = float("nan")
        torch.save({**saved, "about": {"config": config}}, path)
    else:
        formats.save(model, path, about={"config": {**config, "epochs": 3}})
    result = run_script("zero_pruning.py", "--checkpoint", path, "--epochs", "1", "--thresholds", "0",
                        "--data-dir", small_mnist)  # the retraining's accuracy is not what is checked
    assert result.returncode == 0, result.stderr
    assert f"model: checkpoint {path}: " in result.stderr and "; retraining" in result.stderr
    assert "Traceback" not in result.stderr
    assert count_params(load(path)) == 567_434


def start(script, *args):
    return subprocess.Popen(script_command(script, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def interrupt_after(process, line_start, delay, signum=signal.SIGINT):
    """Send the signal `delay` seconds after the process logs a line starting with line_start."""
    for line in process.stderr:
        if line.startswith(line_start):
            time.sleep(delay)
            process.send_signal(signum)
            break
    out, err = process.communicate(timeout=60)
    return process.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("script, moment", [("zero_pruning.py", "training"), ("activation_pruning.py", "sweep")])
def test_ctrl_c_and_sigterm_exit_cleanly_and_keep_the_checkpoint_whole(script, moment, signum, checkpoint, tmp_path):
    path = tmp_path / "mlp.pt"
    path.write_bytes(checkpoint.read_bytes())
    if moment == "training":  # other settings: the run retrains, and is stopped while it does
        process = start(script, "--checkpoint", path, "--epochs", "30")
        code, err = interrupt_after(process, "data:", 3, signum)
    else:
        process = start(script, "--checkpoint", path, "--json", tmp_path / "out.json")
        code, err = interrupt_after(process, "model: loaded", 1, signum)
    assert code == 128 + signum, err
    assert err.strip().splitlines()[-1] == f"{script}: interrupted; saved files are left as they were or complete"
    assert "Traceback" not in err
    assert path.read_bytes() == checkpoint.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]


def test_concurrent_runs_share_a_checkpoint_safely(small_mnist, tmp_path):
    path = tmp_path / "mlp.pt"
    args = ("--checkpoint", path, "--epochs", "1", "--thresholds", "0", "--quiet", "--data-dir", small_mnist)
    processes = [start("zero_pruning.py", *args), start("activation_pruning.py", *args)]
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    assert all("| Threshold |" in out for out, _ in results)
    assert count_params(load(path)) == 567_434
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]


def test_figures_go_to_the_plot_dir_and_leave_the_readmes_alone(checkpoint, tmp_path):
    committed = {p: p.read_bytes() for p in (ROOT / "images").rglob("*.png")}
    result = run_script("zero_pruning.py", "--checkpoint", checkpoint, "--thresholds", "0", "0.05",
                        "--plot-dir", tmp_path / "figs")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["weight_magnitudes.png",
                                                                      "zero_pruning_accuracy.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in (tmp_path / "figs").iterdir())
    assert {p: p.read_bytes() for p in (ROOT / "images").rglob("*.png")} == committed


def test_a_run_in_a_pipe_logs_a_line_per_finished_step_and_names_its_inputs(small_mnist, tmp_path):
    results, _, stderr = run_json("zero_pruning.py", tmp_path, "--checkpoint", tmp_path / "m.pt", "--epochs", "2",
                                  "--thresholds", "0", "0.05", "--finetune-epochs", "1", "--data-dir", small_mnist)
    lines = stderr.splitlines()
    assert [line.split(" (")[0] for line in lines if " done (" in line] == [
        "training: epoch 1/2 done", "training: epoch 2/2 done",
        "fine-tuning at threshold 0: epoch 1/1 done", "sweep: threshold 1/2 done",
        "fine-tuning at threshold 0.05: epoch 1/1 done", "sweep: threshold 2/2 done"]
    assert results["settings"]["data_folder"] == str(small_mnist.resolve())
    assert results["settings"]["checkpoint_file"] == str((tmp_path / "m.pt").resolve())
    quiet = run_script("zero_pruning.py", "--checkpoint", tmp_path / "m.pt", "--epochs", "2", "--thresholds", "0",
                       "--quiet", "--data-dir", small_mnist)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_several_seeds_give_the_mean_and_spread_of_the_single_seed_runs(small_mnist, tmp_path):
    args = ("--epochs", "1", "--thresholds", "0", "0.04", "--data-dir", small_mnist)
    both, stdout, stderr = run_json("zero_pruning.py", tmp_path, *args, "--checkpoint", tmp_path / "m.pt",
                                    "--seeds", "2", "--seed", "3")
    runs = [run_json("zero_pruning.py", tmp_path, *args, "--checkpoint", tmp_path / f"m-seed{seed}.pt",
                     "--seed", str(seed)) for seed in (3, 4)]
    single = [results for results, _, _ in runs]
    assert all(f"model: loaded {tmp_path / f'm-seed{s}.pt'}" in err  # each seed its own file
               for s, (_, _, err) in zip((3, 4), runs))
    assert both["per_seed"] == [s["rows"] for s in single]
    assert both["per_seed_dense_accuracy"] == [s["dense_accuracy"] for s in single]
    for i, row in enumerate(both["rows"]):
        accuracies = [s["rows"][i]["accuracy"] for s in single]
        assert row["accuracy"] == pytest.approx(statistics.mean(accuracies))
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
        assert row["original_params"] == 566_528 and "original_params_std" not in row
    assert both["dense_accuracy"] == pytest.approx(statistics.mean(s["dense_accuracy"] for s in single))
    assert f"{both['rows'][1]['accuracy']:.2f} ± {both['rows'][1]['accuracy_std']:.2f}%" in stdout
    machine = both["settings"]["machine"]
    assert machine["pytorch"] == torch.__version__ and machine["cpu"] and machine["cores"] >= 1
    assert stderr.startswith(f"machine: {machine['cpu']}, ")
    # one seed is the plain run: no spread, no per-seed list
    assert "per_seed" not in single[0] and "accuracy_std" not in single[0]["rows"][0]


@pytest.mark.parametrize("script", ["zero_pruning.py", "activation_pruning.py"])
def test_ctrl_c_while_pytorch_imports_prints_one_line(script):
    process = start(script, "--quiet")
    time.sleep(0.5)  # python is up and importing torch, which takes over a second
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, err
    assert err == f"{script}: interrupted while starting; nothing was written\n" and out == ""


@pytest.mark.parametrize("script", ["zero_pruning.py", "activation_pruning.py"])
def test_a_closed_stdout_still_writes_the_json_and_exits_quietly(script, checkpoint, tmp_path):
    out = tmp_path / "out.json"
    command = f"{sys.executable} {ROOT / script} --checkpoint {checkpoint} --thresholds 0 --json {out} " \
              f"--save-dir {tmp_path / 'models'} | head -c 1"
    result = subprocess.run(["bash", "-c", command + "; exit ${PIPESTATUS[0]}"], capture_output=True, text=True)
    # 141 when head closed the pipe before the table was written, 0 when the table fit in the pipe first
    assert result.returncode in (0, 128 + signal.SIGPIPE) and "Traceback" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr
    assert json.loads(out.read_text())["rows"][0]["threshold"] == 0


@pytest.mark.parametrize("script", ["zero_pruning.py", "activation_pruning.py"])
def test_a_full_disk_ends_in_one_line_and_keeps_the_earlier_file(script, checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.json"
    earlier = json.dumps({"written_by": files.WRITER, "settings": {}, "dense_accuracy": 98.0, "rows": []})
    out.write_text(earlier)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    code = main_in_process(monkeypatch, script, "--checkpoint", checkpoint, "--thresholds", "0", "--json", out,
                           "--quiet")
    err = capsys.readouterr().err
    assert code == 2
    (line,) = err.strip().splitlines()  # the first file the full disk stops, whichever it is
    assert line.startswith(f"{script}: error: cannot write ") and line.endswith(": No space left on device")
    assert out.read_text() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_training_that_diverges_stops_in_one_line():
    model = mlp([6, 5, 3])
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    with pytest.raises(pruning.UserError, match="^training diverged: the weights are no longer finite numbers; "
                                               "lower the learning rate \\(the model is as it was\\)$"):
        recipe.train(model, (x, y), pruning.Recipe(epochs=2, lr=1e30, batch_size=8))


def test_a_first_run_in_a_fresh_copy_makes_its_checkpoints_and_runs_folders(tmp_path, mnist_dir):
    """A fresh clone has no checkpoints/ or runs/ yet: the first run makes them, saves the model
    in the one and keeps its models in a new folder of the other, named in its last line."""
    for source in ROOT.glob("*.py"):
        shutil.copy(source, tmp_path)
    for package in ("pruning", "cli"):
        shutil.copytree(ROOT / package, tmp_path / package)
    result = subprocess.run([sys.executable, tmp_path / "zero_pruning.py", "--epochs", "1", "--thresholds", "0",
                             "--data-dir", mnist_dir, "--quiet"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.suffix for p in (tmp_path / "checkpoints").iterdir()] == [".pt"]
    [run] = (tmp_path / "runs").iterdir()
    assert run.name.startswith("zero_pruning-") and result.stdout.strip().endswith(f"Models: {run}")
    assert sorted(p.name for p in run.iterdir()) == ["csr-threshold0.pt", "dense.pt"]


@pytest.mark.parametrize("script, name", [("zero_pruning.py", "zero-threshold0.05"),
                                          ("activation_pruning.py", "activation-threshold0.3")])
def test_onnx_files_predict_as_the_saved_models_in_onnxruntime(script, name, checkpoint, tmp_path):
    import numpy as np
    import onnxruntime
    threshold = name.split("threshold")[1]
    result = run_script(script, "--checkpoint", checkpoint, "--thresholds", threshold, "--onnx", "--save-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert files.is_ours(tmp_path / f"{name}.onnx")
    saved = pruning.load(tmp_path / (f"csr-threshold{threshold}.pt" if script == "zero_pruning.py" else f"{name}.pt"))
    x = mnist.load(mnist.data_root())[1][0]
    session = onnxruntime.InferenceSession(str(tmp_path / f"{name}.onnx"))
    logits = session.run(None, {"images": x.view(-1, 1, 28, 28).numpy()})[0]
    expected = training.logits(saved, x).numpy()
    assert np.abs(logits - expected).max() <= 1e-4
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_one_shot_reconstruction_beats_magnitude_with_no_training(checkpoint, dense_accuracy, tmp_path, json_of):
    """The bars of pruning without retraining, on the default MLP (seed 0): at 90% zeros at least 3
    points above global magnitude, at 80% at least 0.8; 2:4 within 0.3 points of dense."""
    accuracy = {}
    for method in ("magnitude", "reconstruct"):
        results, stdout = json_of("zero_pruning.py", tmp_path, "--checkpoint", checkpoint, "--one-shot", method,
                                      "--sparsity", "0.8", "0.9", "--baselines", "--save-dir", tmp_path / method)
        accuracy[method] = [r["accuracy"] for r in results["rows"]]
        assert [r["zero_percentage"] for r in results["rows"]] == pytest.approx([80, 90], abs=0.01)
        assert all(r["random_accuracy"] < r["layerwise_accuracy"] < 100 for r in results["rows"])
        assert f"One-shot: {method}, from 2,048 training images, with no training." in stdout
        assert header(stdout)[5:7] == ["Random", "Layer-wise"]
    assert accuracy["reconstruct"][0] >= accuracy["magnitude"][0] + 0.8
    assert accuracy["reconstruct"][1] >= accuracy["magnitude"][1] + 3
    results, stdout = json_of("zero_pruning.py", tmp_path, "--checkpoint", checkpoint, "--one-shot",
                                  "reconstruct", "--pattern", "2:4", "--save-dir", tmp_path / "pattern")
    (row,) = results["rows"]
    assert row["sparsity"] == 0.5 and row["accuracy"] >= dense_accuracy - 0.3
    model = pruning.load(tmp_path / "pattern" / "csr-sparsity0.5.pt")
    for layer in pruning.model.weighted(model):
        assert (layer.weight.view(layer.weight.shape[0], -1, 4) != 0).sum(2).max() <= 2
