"""Drawing figures to files: the matplotlib backend, a shared palette, and saving a PNG with a sidecar of
what it shows.

Beside every PNG, :func:`save` writes ``<name>.json`` with every text the figure shows (titles, labels,
legend entries, captions) and, per axes, its y limits and the y range of every drawn line, read from the
matplotlib objects (:func:`drawn`): tests compare these with ``metrics.json`` and the tables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Colours of models and runs, distinct from the reference curves' (figures.REFERENCE_STYLES).
MODEL_COLOURS = ("C0", "C1", "C3", "C4", "C6", "C9", "C8", "C7")


def marker(values) -> str | None:
    return "o" if len(values) < 30 else None


def wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """The PNG and its sidecar ``<name>.json`` (:func:`drawn`)."""
    from itdiffusion.fsio import atomic_write, atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    atomic_write_json(sidecar_path(path), drawn(fig))
    pyplot().close(fig)


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def drawn(fig) -> dict:
    """Every text of ``fig`` (suptitle, figure texts, axes titles and labels, legend entries, axes texts) and
    per axes its y limits and the y range of each line's finite data."""
    texts = [t.get_text() for t in fig.texts]  # the suptitle among them
    axes = []
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
        legend = ax.get_legend()
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()]
        lines = []
        for line in ax.get_lines():
            y = np.asarray(line.get_ydata(), dtype=float)
            y = y[np.isfinite(y)]
            if y.size:
                lines.append({"label": line.get_label(), "min": float(y.min()), "max": float(y.max())})
        axes.append({"title": ax.get_title(), "ylim": [float(v) for v in ax.get_ylim()], "lines": lines})
    return {"texts": [t for t in texts if t], "axes": axes}
