"""figures.py: the file-size figure from runs' JSON results, and one line for anything else."""

import json

import pytest
from conftest import main_in_process

import figures
import pruning


def result(bits, compressed_bytes):
    row = {"threshold": 0.1, "accuracy": 97.0, "finetuned_accuracy": 98.0, "zero_percentage": 98.0,
           "dense_bytes": 2_000_000, "csr_bytes": 90_000, "quantized_accuracy": 97.9,
           "compressed_bytes": compressed_bytes}
    return {"settings": {"bits": bits, "hidden": [300, 100]}, "dense_accuracy": 98.4, "rows": [row]}


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_sizes_draws_a_png_from_several_runs(tmp_path, monkeypatch):
    runs = [write(tmp_path / f"bits{b}.json", result(b, 1000 * b)) for b in (8, 5)]
    out = tmp_path / "sizes.png"
    assert main_in_process(monkeypatch, "figures.py", "sizes", out, *runs) == 0
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_results_it_cannot_draw_get_one_line_and_no_file(tmp_path, capsys, monkeypatch):
    activation = result(5, 1000)
    del activation["rows"][0]["csr_bytes"]  # activation_pruning.py --bits has no CSR file
    cases = {"activation.json": activation, "list.json": [1, 2],
             "no-bits.json": {**result(5, 1), "settings": {"bits": None}},
             "empty.json": {**result(5, 1), "rows": []}}
    for name, data in cases.items():
        assert not figures.from_zero_pruning_with_bits(data), name
    code = main_in_process(monkeypatch, "figures.py", "sizes", tmp_path / "out.png",
                           write(tmp_path / "list.json", [1, 2]))
    err = capsys.readouterr().err
    assert code == 2 and err.strip().endswith("not the results of zero_pruning.py --bits B --json"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out.png").exists()
    (tmp_path / "broken.json").write_text("{")  # refused the same way, here in process
    with pytest.raises(pruning.UserError, match="cannot read results from"):
        figures.read(tmp_path / "broken.json")
