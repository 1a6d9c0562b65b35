"""Figures that combine the JSON results of several runs.

    python figures.py sizes docs/images/file_sizes.png bits8.json bits5.json bits4.json bits3.json bits2.json
"""

import cli.startup  # noqa: F401, I001 -- first: settles what must be settled before torch is imported

import argparse
import json
import math
from pathlib import Path

from cli import run
from cli import destinations, plots
from pruning import architecture, files


def read(path):
    try:
        files.check_readable(path, files.MAX_RESULTS_BYTES, "results file")
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise files.UserError(f"cannot read results from {files.shown(path)}: "
                               f"{getattr(e, 'strerror', None) or architecture.brief(str(e))}") from None
    except RecursionError:
        raise files.UserError(f"cannot read results from {files.shown(path)}: nested too deeply") from None


ROW_KEYS = {"accuracy", "zero_percentage", "dense_bytes", "csr_bytes", "quantized_accuracy", "compressed_bytes"}


def number(value):
    return type(value) in (int, float) and math.isfinite(value)


def from_zero_pruning_with_bits(result):
    """Whether a run's JSON holds what the sizes figure reads, each of the type it is read as."""
    try:
        settings, rows = result["settings"], result["rows"]
        return (type(settings["bits"]) is int and 1 <= settings["bits"] <= 8
                and isinstance(settings["hidden"], list) and all(type(h) is int for h in settings["hidden"])
                and number(result["dense_accuracy"]) and isinstance(rows, list) and len(rows) > 0
                and all(isinstance(row, dict) and ROW_KEYS <= row.keys() for row in rows)
                and all(number(value) for row in rows for key, value in row.items()
                        if key in ROW_KEYS or key.endswith("accuracy"))
                and all(row["csr_bytes"] > 0 and row["compressed_bytes"] > 0 and row["dense_bytes"] > 0
                        for row in rows))
    except (KeyError, TypeError, AttributeError):
        return False


def sizes(results, path):
    """File size against accuracy: the fp32 CSR files and the compressed ones at each bit width,
    from zero_pruning.py runs with --bits (and the published Deep Compression point for LeNet-300-100)."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = results[0]
    csr = [(r["csr_bytes"], r.get("finetuned_accuracy", r["accuracy"])) for r in first["rows"]]
    ax.plot(*zip(*csr), "ks-", label="fp32 CSR")
    for result in sorted(results, key=lambda r: -r["settings"]["bits"]):
        finetuned = "quantized_finetuned_accuracy" in result["rows"][0]
        key = "quantized_finetuned_accuracy" if finetuned else "quantized_accuracy"
        points = [(r["compressed_bytes"], r[key]) for r in result["rows"]]
        ax.plot(*zip(*points), "o-", label=f"{result['settings']['bits']} bits")
    dense_bytes = first["rows"][0]["dense_bytes"]
    ax.axhline(first["dense_accuracy"], color="gray", ls=":", label=f"dense, {dense_bytes:,} B")
    for times in (40, 100):
        ax.axvline(dense_bytes / times, color="tab:red", lw=0.8, ls="--")
        ax.annotate(f"{times}x smaller", (dense_bytes / times, 0.02), xycoords=("data", "axes fraction"),
                    xytext=(3, 0), textcoords="offset points", color="tab:red", fontsize=8)
    widths = "-".join(map(str, first["settings"]["hidden"]))
    zeros = ", ".join(f"{r['zero_percentage']:.1f}%" for r in first["rows"])
    ax.set(xscale="log", xlabel="file size (bytes, log scale)", ylabel="test accuracy (%)",
           title=f"Compressed files, MLP 784-{widths}-10 at {zeros} zeros")
    ax.legend(fontsize=8)
    plots.save_figure(fig, Path(path))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")
    p.add_argument("figure", choices=["sizes"])
    p.add_argument("output", help="the PNG file to write")
    p.add_argument("results", nargs="+", help="JSON files written by zero_pruning.py --bits B --json")
    args = p.parse_args()
    destinations.check_file_destination("output", args.output)
    destinations.check_distinct([("output", args.output)] + [("results", path) for path in args.results])
    results = [read(path) for path in args.results]
    for path, result in zip(args.results, results):
        if not from_zero_pruning_with_bits(result):
            raise files.UserError(f"{files.shown(path)}: not the results of zero_pruning.py --bits B --json")
    sizes(results, args.output)


if __name__ == "__main__":
    run.main(main)
