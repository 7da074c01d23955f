"""The confusion matrix of `softprompt eval --plot`, as a PNG.

Drawn on a bare matplotlib Figure with the Agg canvas, never through pyplot: it needs no display, and it leaves the
backend of a notebook or program that calls the library as it was.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_atomic


def plot_confusion(matrix: list[list[int]], labels: list[str], path: str | Path, title: str = "") -> Path:
    """Counts per (gold, predicted) label, each cell written in it; rows are the gold labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(labels)
    size = 2.5 + 0.6 * n
    fig = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
