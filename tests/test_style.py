"""The written style: ruff as configured in pyproject.toml, modules of one concept each (at most
400 lines), and `import pruning` light."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_source_file_is_over_400_lines():
    sources = [*ROOT.glob("*.py"), *(ROOT / "pruning").rglob("*.py"), *(ROOT / "cli").glob("*.py")]
    assert {p.relative_to(ROOT).as_posix(): n for p in sources if (n := len(p.read_text().splitlines())) > 400} == {}


def test_the_root_holds_only_entry_points():
    entry_points = {"zero_pruning.py", "activation_pruning.py", "bench.py", "figures.py", "networks.py"}
    assert {p.name for p in ROOT.glob("*.py")} == entry_points
    for name in entry_points:
        text = (ROOT / name).read_text()
        assert 'if __name__ == "__main__":' in text, name
        assert not any(f"import {other[:-3]}" in text for other in entry_points - {name}), name  # none imports another


def test_the_options_are_read_only_once_the_run_starts():
    import pytest

    from cli import options
    args = options.parser("test", [0.0]).parse_args(["--seed", "3"])
    args.seed = 4  # completed by the script's checks before the run
    options.freeze(args)
    with pytest.raises(AttributeError, match="read-only once the run starts"):
        args.seed = 5
    other = options.with_seed(args, 7)
    assert (args.seed, other.seed, other.threads) == (4, 7, args.threads)
    with pytest.raises(AttributeError, match="read-only"):
        other.busy = True


def test_saving_takes_no_command_line_option_name():
    import inspect

    import pruning
    for function in (pruning.save, pruning.export_onnx, pruning.files.atomic_write):
        assert "option" not in inspect.signature(function).parameters, function.__name__


def test_no_public_function_takes_more_than_five_positional_parameters():
    import inspect

    import pruning
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    counts = {name: sum(p.kind in positional for p in inspect.signature(getattr(pruning, name)).parameters.values())
              for name in pruning.__all__ if inspect.isfunction(getattr(pruning, name))}
    assert {name: n for name, n in counts.items() if n > 5} == {}
    assert len(counts) > 30  # every function of the API was looked at


def test_every_public_function_has_type_hints():
    import inspect
    import typing

    import pruning
    functions = {name: getattr(pruning, name) for name in pruning.__all__ if inspect.isfunction(getattr(pruning, name))}
    unannotated = {name for name, f in functions.items()
                   if inspect.signature(f).return_annotation is inspect.Signature.empty
                   or any(p.annotation is inspect.Parameter.empty for p in inspect.signature(f).parameters.values())}
    assert unannotated == set()
    assert all(typing.get_type_hints(f) for f in functions.values())  # each hint names something real


def test_a_recipe_takes_its_fields_by_name_and_nothing_else():
    import pytest
    import torch

    import pruning
    model, data = torch.nn.Sequential(torch.nn.Linear(4, 2)), (torch.rand(8, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match="unexpected keyword arguments epoch; a Recipe's fields are epochs, lr"):
        pruning.train(model, data, epoch=1)
    with pytest.raises(ValueError, match="recipe must be a pruning.Recipe, not 1"):
        pruning.train(model, data, 1)
    recipe = pruning.Recipe(epochs=3, lr=0.5)
    assert pruning.training.recipe_of(recipe, {"lr": 0.1}, "train") == pruning.Recipe(epochs=3, lr=0.1)
