"""The README's headline results held to their bars: each command run with --json on all of MNIST
(the dense model trained by the first command that needs it), every figure printed beside the bar
it must meet. Minutes a command, so `python bench.py --bars` runs them; the tests run the same
commands' workings on a slice of MNIST."""

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

DENSE_FILE_BYTES = 2_272_781  # the default MLP saved dense: what "times smaller" divides


@dataclasses.dataclass(frozen=True)
class Bar:
    """One figure of a command's --json results and the bound it must keep."""
    figure: str
    measure: Callable[[dict], float]
    at_most: float | None = None
    at_least: float | None = None

    def met(self, value: float) -> bool:
        return (self.at_most is None or value <= self.at_most) and (self.at_least is None or value >= self.at_least)

    def bound(self) -> str:
        return f"<= {self.at_most:,.6g}" if self.at_most is not None else f">= {self.at_least:,.6g}"


def row(results):
    (only,) = results["rows"]
    return only


def drops(results, column="finetuned_accuracy"):
    """Points below dense of each seed's one row."""
    if "per_seed" not in results:
        return [results["dense_accuracy"] - row(results)[column]]
    return [dense - rows[0][column] for dense, rows in zip(results["per_seed_dense_accuracy"], results["per_seed"])]


def zeros(percent):
    return Bar("zeros (%)", lambda r: row(r)["zero_percentage"], at_least=percent)


def fewer_parameters(percent):
    return Bar("fewer parameters (%)", lambda r: row(r)["size_reduction"], at_least=percent)


WITHIN_HALF_A_POINT = Bar("points below dense, fine-tuned", lambda r: drops(r)[0], at_most=0.5)
COMMANDS = {  # name: (the README's command, its bars)
    "zero pruning to 98.5% zeros, 5-bit file": (
        ["zero_pruning.py", "--sparsity", "0.985", "--steps", "10", "--finetune-epochs", "2", "--distill",
         "--bits", "5"],
        [zeros(98.5),
         WITHIN_HALF_A_POINT,
         Bar("points below dense, 5-bit file", lambda r: drops(r, "quantized_finetuned_accuracy")[0], at_most=0.5),
         Bar("compressed file (B)", lambda r: row(r)["compressed_bytes"], at_most=DENSE_FILE_BYTES / 100),
         Bar("epochs of training in all", lambda r: r["settings"]["final_epochs"] + 9 * 2, at_most=30)]),
    "zero pruning to 95% zeros in one cut, 4 epochs of fine-tuning": (
        ["zero_pruning.py", "--sparsity", "0.95", "--finetune-epochs", "4"],
        [zeros(95),
         WITHIN_HALF_A_POINT]),
    "zero pruning by saliency to 95% zeros": (
        ["zero_pruning.py", "--sparsity", "0.95", "--steps", "2", "--finetune-epochs", "2", "--criterion", "saliency"],
        [zeros(95),
         WITHIN_HALF_A_POINT]),
    "variational dropout, then steps to 98.5% zeros": (
        ["zero_pruning.py", "--sparsity", "0.985", "--steps", "2", "--finetune-epochs", "1", "--final-epochs", "2",
         "--distill", "--variational-dropout", "1", "--variational-dropout-epochs", "1"],
        [zeros(98.5),
         Bar("accuracy, fine-tuned (%)", lambda r: row(r)["finetuned_accuracy"], at_least=96)]),
    "LeNet-300-100 to 98% zeros": (
        ["zero_pruning.py", "--hidden", "300", "100", "--sparsity", "0.98", "--steps", "10", "--finetune-epochs", "2",
         "--distill"],
        [Bar("dense accuracy (%)", lambda r: r["dense_accuracy"], at_least=97.5),
         zeros(98),
         WITHIN_HALF_A_POINT]),
    "activation pruning to 95% fewer parameters, seeds 0 and 1": (
        ["activation_pruning.py", "--reduction", "0.95", "--steps", "6", "--finetune-epochs", "4", "--distill",
         "--prune-inputs", "--seeds", "2"],
        [Bar("parameters kept, the larger seed", lambda r: max(rows[0]["new_params"] for rows in r["per_seed"]),
             at_most=28_371),
         Bar("points below dense, mean of the seeds", lambda r: statistics.mean(drops(r)), at_most=0.5),
         Bar("points below dense, the worse seed", lambda r: max(drops(r)), at_most=0.6),
         Bar("epochs of training in all", lambda r: r["settings"]["final_epochs"] + 5 * 4, at_most=40)]),
    "activation pruning at threshold 0.9, 10 epochs of fine-tuning": (
        ["activation_pruning.py", "--thresholds", "0.9", "--finetune-epochs", "10"],
        [fewer_parameters(80),
         WITHIN_HALF_A_POINT]),
    "activation pruning by saliency to 80% fewer parameters": (
        ["activation_pruning.py", "--reduction", "0.8", "--steps", "2", "--finetune-epochs", "2", "--distill",
         "--prune-inputs", "--criterion", "saliency"],
        [fewer_parameters(80),
         WITHIN_HALF_A_POINT]),
}
COLUMNS = [("Command", "command", str), ("Figure", "figure", str), ("Measured", "measured", str), ("Bar", "bar", str),
           ("Met", "met", str)]


def checked(name, results):
    """The table rows of one command's results against its bars."""
    rows = []
    for bar in COMMANDS[name][1]:
        value = bar.measure(results)
        rows.append({"command": name, "figure": bar.figure, "measured": f"{value:,.6g}", "bar": bar.bound(),
                     "met": "yes" if bar.met(value) else "NO"})
    return rows


def run_all(data_dir, threads):
    """Run every command in a temporary folder, each dense model trained by the first that needs it
    (whose seconds include the training); returns (table rows, seconds each)."""
    rows, seconds = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (command, _)) in enumerate(COMMANDS.items()):
            out = Path(tmp) / f"{i}.json"
            start = time.perf_counter()
            dense = Path(tmp) / ("lenet-300-100.pt" if "--hidden" in command else "mlp.pt")  # trained once
            subprocess.run([sys.executable, *command, "--quiet", "--json", str(out), "--checkpoint", str(dense),
                            "--save-dir", str(Path(tmp) / str(i)),
                            "--data-dir", str(data_dir), "--threads", str(threads)],
                           check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).parent.parent)
            seconds[name] = time.perf_counter() - start
            rows += checked(name, json.loads(out.read_text()))
    return rows, seconds
