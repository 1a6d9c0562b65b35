"""Figures: accuracy against what was removed, drawn the same way for both methods."""

import logging

from pruning import files

log = logging.getLogger("pruning")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def accuracy_figure(rows, baseline, removed_key, what, curves, published=()):
    """Two panels: accuracy against the share of `what` removed over the whole range, where a
    one-shot collapse shows, and zoomed on the recovered curves against the share kept on a log axis.
    curves: (row key, label) pairs, drawn where the rows hold them; published: (name, % kept, % error)."""
    plt = pyplot()
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4.2))
    removed = [r[removed_key] for r in rows]
    curves = [(key, label, f"{'os^vd'[i]}{'-' if i < 3 else '--'}C{i}") for i, (key, label) in enumerate(curves)
              if key in rows[0]]
    for key, label, style in curves:
        full.plot(removed, [r[key] for r in rows], style, label=label)
    full.axhline(baseline, color="gray", ls=":", label=f"unpruned model ({baseline:.2f}%)")
    full.set(xlabel=f"{what} removed (%)", ylabel="test accuracy (%)", title="The whole range")
    full.legend(fontsize=8)

    zoomed = curves[1:] or curves
    for key, label, style in zoomed:
        zoom.plot([100 - x for x in removed], [r[key] for r in rows], style, label=label)
    for i, (name, kept, error) in enumerate(published):
        zoom.plot(kept, 100 - error, "k*", ms=9)
        zoom.annotate(name, (kept, 100 - error), xytext=(5, -12 if i % 2 else 5), textcoords="offset points",
                      fontsize=8)
    zoom.axhline(baseline, color="gray", ls=":", label=f"unpruned model ({baseline:.2f}%)")
    accuracies = [r[key] for r in rows for key, _, _ in zoomed] + [100 - e for _, _, e in published]
    zoom.set(xscale="log", xlabel=f"{what} kept (%, log scale)", ylabel="test accuracy (%)",
             ylim=(max(min(accuracies), baseline - 5) - 0.2, max(accuracies + [baseline]) + 0.3),
             title=f"Zoomed: {what} kept against accuracy")
    zoom.xaxis.set_major_formatter(plt.FuncFormatter("{:g}".format))
    zoom.xaxis.set_minor_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}" if f"{x:g}"[0] in "25" else ""))
    zoom.invert_xaxis()
    zoom.legend(fontsize=8)
    return fig


def save_figure(fig, path):
    """Write fig as a PNG that says it is ours (its Software text), atomically."""
    fig.tight_layout()
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, metadata={"Software": files.WRITER}))
    pyplot().close(fig)
    log.info(f"figure: {path}")
