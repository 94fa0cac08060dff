"""Plots and tables of evaluation results: PNGs drawn with matplotlib's Agg canvas (no display,
no pyplot state), Markdown tables as text.

- :func:`plot_prefix_curves`: a tokenizer's metrics against the number of tokens decoded;
- :func:`plot_rate_distortion`: the tokenizer as a codec, its PSNR (and SSIM) against the bits
  its token prefixes carry, beside the same-bits thumbnail and the mean colour;
- :func:`plot_by_position`: a per-position curve (e.g. held-out NLL) for any number of arms,
  with a band of +- one standard deviation over seeds;
- :func:`plot_contrasts`: paired differences with their confidence intervals and a zero line
  (:func:`nativetok_jax.evaluation.paired_bootstrap.paired_bootstrap_interval`'s results);
- :func:`markdown_table`: ``{row: {column: (mean, std)}}`` as a GitHub Markdown table, its
  cells from per-seed reports by :func:`summarize_runs`.

The plot functions write the PNG (local or a URL) and return the ``Figure`` for notebooks.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
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
    ``prefix`` list of the evaluation JSON). The x axis is log2, as the lengths grow 1, 2, 4, ...
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


def plot_rate_distortion(rows: Sequence[Mapping[str, Any]], path: storage.PathLike) -> Figure:
    """Writes a PNG of PSNR (and SSIM, when the rows hold it) against bits, and returns the figure.

    ``rows`` are the evaluation JSON's ``rate_distortion`` list (``tokens``, ``bits``, ``psnr``,
    ``thumbnail_side``, ``thumbnail_bits_per_channel``, ``thumbnail_psnr``, ``mean_colour_psnr``,
    ``ssim`` ...). One line is the tokenizer's prefix decoder, one the same-bits no-model codec
    (each point labelled with its thumbnail side, or its bits per channel under 24 bits), and a
    dashed level the mean colour. The x axis is log2 bits, each tick labelled with its tokens.

    Raises:
      ValueError: if there is no row.
    """
    if not rows:
        raise ValueError("plot_rate_distortion needs at least one row")
    rows = sorted(rows, key=lambda row: row["bits"])
    metrics = [m for m in ("psnr", "ssim") if all(m in row and f"thumbnail_{m}" in row for row in rows)]
    figure = new_figure(5.0 * len(metrics), 3.8)
    bits = [row["bits"] for row in rows]
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        axes.plot(bits, [row[metric] for row in rows], marker="o", label="tokenizer (first k tokens)")
        axes.plot(bits, [row[f"thumbnail_{metric}"] for row in rows], marker="s", label="same-bits thumbnail")
        for row in rows:
            side = row["thumbnail_side"]
            label = (f"{side}x{side}" if row["thumbnail_bits_per_channel"] == 8
                     else f"mean, {row['thumbnail_bits_per_channel']} bit/ch")
            axes.annotate(label, (row["bits"], row[f"thumbnail_{metric}"]), xytext=(0, -12),
                          textcoords="offset points", ha="center", fontsize=7)
        if f"mean_colour_{metric}" in rows[0]:
            axes.axhline(rows[0][f"mean_colour_{metric}"], color="grey", linestyle="--",
                         label="mean colour (24 bits)")
        axes.set_xscale("log", base=2)
        axes.set_xticks(bits, [f"{b:g}\n({row['tokens']})" for b, row in zip(bits, rows)])
        axes.set_xticks([], minor=True)
        axes.set_xlabel("bits per image (tokens)")
        axes.set_title(TITLES.get(metric, metric), fontsize=10)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    save_figure(figure, path, dpi=100)
    return figure


def plot_by_position(
    curves: Mapping[str, Sequence[float] | Sequence[Sequence[float]] | np.ndarray],
    path: storage.PathLike,
    *,
    ylabel: str = "held-out NLL (nats)",
    title: str = "negative log-likelihood by position",
    xlabel: str = "token position",
) -> Figure:
    """Writes a PNG of one curve per arm against the token position (1-based) and returns the figure.

    ``curves`` maps an arm's name to its values, ``[L]`` for one run or ``[seeds, L]`` for several:
    the line is the mean over seeds and, with two or more seeds, a shaded band spans mean +- the
    sample standard deviation (``ddof=1``). The legend gives each arm's mean over positions (and
    over seeds, +- the standard deviation of the per-seed means). Arms may differ in length.

    Raises:
      ValueError: if there is no arm, or an arm's values are not ``[L]`` / ``[seeds, L]`` with
        ``L >= 1``.
    """
    if not curves:
        raise ValueError("plot_by_position needs at least one arm")
    figure = new_figure(6.5, 3.8)
    axes = figure.add_subplot()
    for arm, values in curves.items():
        runs = np.asarray(values, dtype=np.float64)
        runs = runs[None] if runs.ndim == 1 else runs
        if runs.ndim != 2 or 0 in runs.shape:
            raise ValueError(f"plot_by_position: arm {arm!r} must be [L] or [seeds, L], "
                             f"got shape {list(np.shape(values))}")
        positions = np.arange(1, runs.shape[1] + 1)
        mean = runs.mean(axis=0)
        label = f"{arm}: {runs.mean():.3f}"
        if len(runs) > 1:
            label += f" ± {runs.mean(axis=1).std(ddof=1):.3f} ({len(runs)} seeds)"
        (line,) = axes.plot(positions, mean, marker=".", label=label)
        if len(runs) > 1:
            spread = runs.std(axis=0, ddof=1)
            axes.fill_between(positions, mean - spread, mean + spread, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(figure, path, dpi=100)
    return figure


def plot_contrasts(
    contrasts: Mapping[str, Mapping[str, float]],
    path: storage.PathLike,
    *,
    xlabel: str = "difference in held-out NLL (nats/token)",
    title: str = "paired differences with 95 % bootstrap intervals",
) -> Figure:
    """Writes a PNG of each contrast's difference and interval, one row each, and returns the figure.

    ``contrasts`` maps a contrast's name (e.g. ``"native - order_free"``) to a mapping with
    ``mean_difference``, ``low`` and ``high`` (what ``paired_bootstrap_interval`` returns). Each
    row is a point with a horizontal interval bar, labelled with its numbers; a vertical line marks
    zero, so an interval that does not cross it is a difference of known sign.

    Raises:
      ValueError: if there is no contrast, one lacks a field, or ``low <= mean_difference <= high``
        does not hold.
    """
    if not contrasts:
        raise ValueError("plot_contrasts needs at least one contrast")
    rows = []
    for name, contrast in contrasts.items():
        missing = [field for field in ("mean_difference", "low", "high") if field not in contrast]
        if missing:
            raise ValueError(f"plot_contrasts: contrast {name!r} lacks {', '.join(missing)}")
        mean, low, high = (float(contrast[field]) for field in ("mean_difference", "low", "high"))
        if not low <= mean <= high:
            raise ValueError(f"plot_contrasts: contrast {name!r} needs low <= mean_difference <= high, "
                             f"got {low}, {mean}, {high}")
        rows.append((name, mean, low, high))
    figure = new_figure(6.5, 1.2 + 0.55 * len(rows))
    axes = figure.add_subplot()
    heights = np.arange(len(rows))[::-1]  # the first contrast on top
    for height, (name, mean, low, high) in zip(heights, rows):
        axes.errorbar([mean], [height], xerr=[[mean - low], [high - mean]], fmt="o", capsize=4)
        axes.annotate(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]", (mean, height), xytext=(0, 7),
                      textcoords="offset points", ha="center", fontsize=8)
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_yticks(heights, [name for name, *_ in rows])
    axes.set_ylim(-0.7, len(rows) - 0.3)
    axes.margins(x=0.15)  # room for the labels of the outermost intervals
    axes.set_xlabel(xlabel)
    axes.set_title(title, fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)
    save_figure(figure, path, dpi=100)
    return figure


def markdown_table(
    rows: Mapping[str, Mapping[str, tuple[float, float | None] | float | None]],
    *,
    columns: Sequence[str] | None = None,
    row_header: str = "arm",
    digits: int = 3,
) -> str:
    """A GitHub Markdown table of ``{row: {column: (mean, std)}}``, e.g. ``{arm: {figure: ...}}``.

    A cell is ``(mean, std)``, shown ``mean ± std`` (``std`` ``None`` or NaN, e.g. one seed:
    ``mean`` alone), or a plain number; a missing or ``None`` cell shows ``–``. Numbers get
    ``digits`` decimals (integers print as integers). ``columns`` picks and orders the columns
    (default: every column in the order first seen). Returns the table, ending with a newline
    (:func:`nativetok_jax.storage.write_text` writes it, e.g. beside the plots).

    Raises:
      ValueError: if there are no rows or no columns.
    """
    if not rows:
        raise ValueError("markdown_table needs at least one row")
    if columns is None:
        columns = list(dict.fromkeys(column for cells in rows.values() for column in cells))
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    lines = [_markdown_row([row_header, *columns]), _markdown_row(["---"] + ["---:"] * len(columns))]
    for name, cells in rows.items():
        lines.append(_markdown_row([name] + [_markdown_cell(cells.get(column), digits) for column in columns]))
    return "\n".join(lines) + "\n"


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float | None]]:
    """Each scalar figure's ``(mean, std)`` over runs (e.g. seeds): the cells of :func:`markdown_table`.

    ``runs`` are one report per run (``{"nll_per_token": 2.85, "psnr": 19.2, ...}``). A figure is
    summarised when every run holds it as a real number (lists, strings and ``None`` are left
    out); ``std`` is the sample standard deviation (``ddof=1``), ``None`` for a single run. Keys
    keep the first run's order.

    Raises:
      ValueError: if there are no runs.
    """
    if not runs:
        raise ValueError("summarize_runs needs at least one run")

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

    summary: dict[str, tuple[float, float | None]] = {}
    for key in runs[0]:
        if all(is_number(run.get(key)) for run in runs):
            values = np.array([float(run[key]) for run in runs])
            summary[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None)
    return summary


def _markdown_cell(cell: tuple[float, float | None] | float | None, digits: int) -> str:
    if cell is None:
        return "–"
    if isinstance(cell, (tuple, list)):
        mean, std = cell
        text = _markdown_cell(mean, digits)
        return text if std is None or math.isnan(std) else f"{text} ± {float(std):.{digits}f}"
    if isinstance(cell, (int, np.integer)) and not isinstance(cell, bool):
        return str(int(cell))
    return f"{float(cell):.{digits}f}"


def _markdown_row(cells: Sequence[str]) -> str:
    # A "|" inside a cell would end it early.
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


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
