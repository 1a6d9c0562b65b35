"""Results: rows of measured numbers (a model's scores), their means over seeds, the JSON they are
written to, and the Markdown tables they are printed as."""

import json
import statistics

from pruning import files, training

VARIES = "varies"


def scores(model, validation, test_data, key="accuracy"):
    """{key: test accuracy}, with validation_<key> beside it when images are held out."""
    row = {key: training.accuracy(model, test_data)}
    if validation is not None:
        row[f"validation_{key}"] = training.accuracy(model, validation)
    return row


def label(value):
    """How a threshold or fraction is printed in a table, and named in a file."""
    return f"{value:.4g}"


def mean_row(rows):
    """One row from the same row of several runs: means and sample standard deviations (of lists
    of widths, element by element, and of dicts of numbers key by key; other lists, such as the
    pixels kept, are sets, never averaged)."""
    out = {}
    for key, value in rows[0].items():
        values = [r[key] for r in rows]
        if all(v == value for v in values):
            out[key] = value
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key], out[f"{key}_std"] = statistics.mean(values), statistics.stdev(values)
        elif key.endswith("widths") and all(isinstance(v, list) and len(v) == len(value)
                                            and all(isinstance(x, (int, float)) for x in v) for v in values):
            out[key] = [statistics.mean(column) for column in zip(*values)]
            out[f"{key}_std"] = [statistics.stdev(column) for column in zip(*values)]
        elif all(isinstance(v, dict) and v.keys() == value.keys()
                 and all(isinstance(x, (int, float)) for x in v.values()) for v in values):  # speed-ups by batch
            out[key] = {k: statistics.mean(v[k] for v in values) for k in value}
            out[f"{key}_std"] = {k: statistics.stdev(v[k] for v in values) for k in value}
        else:
            out[key] = VARIES
    return out


def write_json(path, settings, rows, dense_accuracies, per_seed, extra=None):
    """settings, the dense model's accuracy, one object per table row, and with several seeds
    each seed's rows."""
    results = {"written_by": files.WRITER, "settings": settings, "dense_accuracy": statistics.mean(dense_accuracies)}
    if len(per_seed) > 1:
        results["dense_accuracy_std"] = statistics.stdev(dense_accuracies)
    results.update(extra or {})
    results["rows"] = rows
    if len(per_seed) > 1:
        results["per_seed"] = per_seed
        results["per_seed_dense_accuracy"] = dense_accuracies
    text = json.dumps(results, indent=2, allow_nan=False, ensure_ascii=True) + "\n"
    files.atomic_write(path, lambda f: f.write(text.encode()))


def markdown_table(rows, columns):
    """columns: (header, key, format function) triples; rows: dicts holding those keys, and
    <key>_std for a mean over seeds, shown as 98.31 ± 0.06%."""
    def cell(row, key, fmt):
        if row[key] == VARIES:
            return VARIES
        text = fmt(row[key])
        if f"{key}_std" not in row:
            return text
        unit = "%" if text.endswith("%") else ""
        return f"{text.removesuffix(unit)} ± {fmt(row[f'{key}_std']).removesuffix(unit)}{unit}"

    cells = [[header for header, _, _ in columns]]
    cells += [[cell(row, key, fmt) for _, key, fmt in columns] for row in rows]
    width = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(line, width)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in width) + "|")
    return "\n".join(lines)
