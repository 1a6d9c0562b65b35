"""bench.py's parts, on tiny inputs: its figures are printed, never asserted, but it must run."""

import argparse

import pytest
import torch
from conftest import main_in_process, no_network

import bench
import pruning
from cli import bars, waiting
from cli.results import markdown_table
from pruning.model import mlp


def test_latency_rows_time_both_models_at_every_batch_size(monkeypatch):
    monkeypatch.setattr(bench, "BATCHES", (1, 32, 100))  # the README's 10,000 would only take longer
    torch.manual_seed(0)
    dense, small = mlp([784, 64, 10]), mlp([784, 8, 10])
    rows = bench.latency_rows("small", dense, small, torch.rand(100, 784))
    assert [r["batch"] for r in rows] == [1, 32, 100]
    for r in rows:
        assert r["dense_ms"] > 0 and r["pruned_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["pruned_ms"])
        assert r["arithmetic"] == pytest.approx((784 * 64 + 64 * 10) / (784 * 8 + 8 * 10))
        assert r["realized"] == pytest.approx(r["speedup"] / r["arithmetic"])
    last_line = markdown_table(rows, bench.COLUMNS).splitlines()[-1]
    assert [cell.strip() for cell in last_line.split("|")[1:3]] == ["small", "100"]


@pytest.mark.slow
def test_alone_rows_time_each_model_in_a_process_of_its_own(mnist_dir, tmp_path):
    torch.manual_seed(0)
    dense = mlp([784, 64, 10])
    pruning.save(dense, tmp_path / "dense.pt")
    pruning.save(pruning.zero_prune(dense, 0.9), tmp_path / "sparse.pt", storage="csr")
    row = bench.alone_row("sparse", tmp_path / "dense.pt", tmp_path / "sparse.pt", 32, mnist_dir)
    assert (row["model"], row["batch"]) == ("sparse", 32) and row["dense_ms"] > 0 and row["pruned_ms"] > 0
    assert row["speedup"] == pytest.approx(row["dense_ms"] / row["pruned_ms"])


@pytest.mark.slow
def test_the_state_of_the_art_commands_pass_every_check_before_the_data(tmp_path, capsys, monkeypatch):
    """bench.py times these from scratch; each must get as far as loading the (here missing) data,
    its script's main run in this process as its command line runs it."""
    no_network(monkeypatch)
    for name, command in bench.state_of_the_art_commands(tmp_path, tmp_path / "no-data").items():
        code = main_in_process(monkeypatch, *command[1:])
        err = capsys.readouterr().err
        assert code == 2 and "the download failed" in err, (name, err)


@pytest.mark.slow
def test_wait_policy_rows_time_each_setting_in_a_child(mnist_dir):
    args = argparse.Namespace(data_dir=str(mnist_dir), threads=1)
    rows = waiting.wait_policy_rows(args, competitors=(0,), rounds=1, examples=256)
    assert [r["setting"] for r in rows] == list(waiting.WAIT_SETTINGS)
    assert all(r["others"] == 0 and float(r["seconds"]) > 0 for r in rows)


def test_step_seconds_times_the_three_kinds_of_step_on_copies():
    torch.manual_seed(0)
    model = mlp([784, 16, 10])
    before = [p.clone() for p in model.parameters()]
    args = argparse.Namespace(lr=1e-3, batch_size=4, seed=0)
    times = bench.step_seconds(args, model, (torch.rand(32, 784), torch.randint(0, 10, (32,))), rounds=2, steps=2)
    assert list(times) == ["plain", "masked", "masked, distilled"] and all(t > 0 for t in times.values())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_readme_bars_compare_each_figure_with_its_bound():
    results = {"dense_accuracy": 98.4, "settings": {"final_epochs": 10},
               "rows": [{"zero_percentage": 98.5, "finetuned_accuracy": 97.8, "quantized_finetuned_accuracy": 97.95,
                         "compressed_bytes": 22_728}]}
    rows = bars.checked("zero pruning to 98.5% zeros, 5-bit file", results)
    assert [(r["figure"], r["measured"], r["met"]) for r in rows] == [
        ("zeros (%)", "98.5", "yes"), ("points below dense, fine-tuned", "0.6", "NO"),
        ("points below dense, 5-bit file", "0.45", "yes"), ("compressed file (B)", "22,728", "NO"),
        ("epochs of training in all", "28", "yes")]
    seeds = {"dense_accuracy": 98.35, "settings": {"final_epochs": 20}, "per_seed_dense_accuracy": [98.4, 98.3],
             "per_seed": [[{"new_params": 28_000, "finetuned_accuracy": 98.0}],
                          [{"new_params": 28_372, "finetuned_accuracy": 97.7}]]}
    rows = bars.checked("activation pruning to 95% fewer parameters, seeds 0 and 1", seeds)
    assert [(r["measured"], r["bar"], r["met"]) for r in rows] == [
        ("28,372", "<= 28,371", "NO"), ("0.5", "<= 0.5", "yes"), ("0.6", "<= 0.6", "yes"), ("40", "<= 40", "yes")]
