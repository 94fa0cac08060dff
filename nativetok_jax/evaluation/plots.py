"""Plots of evaluation results, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nativetok_jax import storage

# Panel titles, in panel order; a metric not listed here comes last, titled by its key.
TITLES = {
    "psnr": "PSNR (dB, higher is better)",
    "ssim": "SSIM (higher is better)",
    "lpips": "LPIPS (lower is better)",
    "rfid": "rFID (lower is better)",
    "inception_score": "Inception Score",
    "codebook_usage": "codebook usage (fraction of codes)",
    "perplexity": "code perplexity",
}
_SPREAD_SUFFIX = "_std"


def plot_prefix_curves(prefix_rows: Sequence[Mapping[str, Any]], path: storage.PathLike, columns: int = 3) -> None:
    """Writes a PNG to ``path`` (local or a URL) with one panel per metric against the number of tokens decoded.

    ``prefix_rows`` are ``{"num_tokens": k, "<metric>": value, ...}``, one per prefix length (the
    ``prefix`` list of the evaluation JSON). The x axis is log2, as the lengths grow 1, 4, 16, ...
    A ``<metric>_std`` entry is drawn as error bars on ``<metric>`` rather than as its own panel.
    """
    if not prefix_rows:
        raise ValueError("plot_prefix_curves needs at least one row")
    rows = sorted(prefix_rows, key=lambda row: row["num_tokens"])
    present = [key for key in rows[0] if key != "num_tokens" and not key.endswith(_SPREAD_SUFFIX)]
    metrics = [key for key in TITLES if key in present] + [key for key in present if key not in TITLES]
    if not metrics:
        raise ValueError("plot_prefix_curves: the rows hold no metric besides num_tokens")
    columns = min(columns, len(metrics))
    grid_rows = math.ceil(len(metrics) / columns)
    figure = new_figure(4.0 * columns, 3.2 * grid_rows)
    tokens = [row["num_tokens"] for row in rows]
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(grid_rows, columns, index + 1)
        values = [row[metric] for row in rows]
        spread = [row.get(metric + _SPREAD_SUFFIX) for row in rows]
        if all(s is not None for s in spread):
            axes.errorbar(tokens, values, yerr=spread, marker="o", capsize=3)
        else:
            axes.plot(tokens, values, marker="o")
        axes.set_xscale("log", base=2)
        axes.set_xticks(tokens, [str(k) for k in tokens])
        axes.set_xticks([], minor=True)
        axes.set_xlabel("tokens decoded")
        axes.set_title(TITLES.get(metric, metric), fontsize=10)
        axes.grid(True, alpha=0.3)
    save_figure(figure, path, dpi=100)


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on its own Agg canvas (``width`` x ``height`` inches, constrained layout)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: storage.PathLike, dpi: int = 110) -> None:
    """Writes ``figure`` as a PNG to ``path`` (local or a URL)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    storage.write_bytes(path, buffer.getvalue())
