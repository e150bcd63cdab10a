"""Quality against bits per weight: the Pareto front and its plot (matplotlib: the ``plot`` extra)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..extras import require

logger = logging.get_logger(__name__)

__all__ = ["pareto_front", "plot_quality_vs_bits"]



def _quality(result: Mapping[str, Any], key: str) -> float:
    """The quality value ``key`` of a result (under ``metrics`` or at the top level)."""
    metrics = result.get("metrics") if isinstance(result.get("metrics"), Mapping) else {}
    value = metrics.get(key, result.get(key))
    if value is None:
        raise KeyError(f"result {result.get('label', '?')!r} has no quality value {key!r}")
    return float(value)


def pareto_front(results: Sequence[Mapping[str, Any]], quality_key: str, higher_is_better: bool = True,
                 bits_key: str = "bits_per_weight") -> list[int]:
    """Indices of the results no other result beats on both bits (fewer) and quality.

    A result is on the front when no other has ``bits <=`` and quality at least as good with one
    of the two strictly better. Returned in order of increasing bits.
    """
    points = [(float(r[bits_key]), _quality(r, quality_key) * (1 if higher_is_better else -1)) for r in results]
    front = []
    for i, (bits, quality) in enumerate(points):
        dominated = any(
            b <= bits and q >= quality and (b < bits or q > quality) for j, (b, q) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_quality_vs_bits(
    results: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    quality_key: str,
    higher_is_better: bool = True,
    *,
    bits_key: str = "bits_per_weight",
    label_key: str = "label",
    group_key: str = "method",
    title: str | None = None,
    reference: float | None = None,
    log_y: bool = False,
    y_max: float | None = None,
) -> Path:
    """Plot quality against bits per weight (one marker series per method), the Pareto front marked.

    Args:
        results: result dicts with ``bits_per_weight`` and the quality (under ``metrics`` or at the
            top level); ``label`` annotates each point, ``method`` groups markers.
        path: the PNG to write (parent folders created).
        quality_key: e.g. ``"perplexity"`` or ``"embedding_cosine"``.
        higher_is_better: direction of the quality for the Pareto front.
        reference: optional float-model value drawn as a horizontal dashed line.
        log_y: logarithmic quality axis (useful for perplexity).
        y_max: clip the quality axis here; points above it are drawn on the top edge as
            triangles annotated with their value (a collapsed configuration would otherwise
            squash the rest of the plot).

    Returns:
        The written path.

    Raises:
        ValueError: no result has ``bits_key``.
        KeyError: a result has no ``quality_key``.
        ImportError: matplotlib is missing (``pip install 'hf-splitquant[plot]'``).
    """
    matplotlib = require("matplotlib", "plot", "plot_quality_vs_bits")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "plot", "plot_quality_vs_bits")

    rows = [r for r in results if r.get(bits_key) is not None]
    if not rows:
        raise ValueError(f"no result has `{bits_key}`; nothing to plot")
    front = pareto_front(rows, quality_key, higher_is_better, bits_key)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    markers = "osD^vP*X"

    def shown(value: float) -> float:
        return min(value, y_max) if y_max is not None else value

    groups = list(dict.fromkeys(str(r.get(group_key, "")) for r in rows))
    for g, group in enumerate(groups):
        members = [r for r in rows if str(r.get(group_key, "")) == group]
        ax.scatter([float(r[bits_key]) for r in members], [shown(_quality(r, quality_key)) for r in members],
                   marker=markers[g % len(markers)], s=46, label=group or None, zorder=3)
    for r in rows:
        value = _quality(r, quality_key)
        off_scale = y_max is not None and value > y_max
        text = f"{r.get(label_key, '')}\n{value:.4g}" + (" (off scale)" if off_scale else "")
        ax.annotate(text, (float(r[bits_key]), shown(value)), textcoords="offset points",
                    xytext=(5, -12 if off_scale else 4), fontsize=7, color="0.25")
        if off_scale:
            ax.scatter([float(r[bits_key])], [y_max], marker="^", s=70, color="0.3", zorder=5)
    fx = [float(rows[i][bits_key]) for i in front]
    fy = [shown(_quality(rows[i], quality_key)) for i in front]
    ax.plot(fx, fy, "-", color="crimson", lw=1.4, zorder=2)
    ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="crimson", lw=1.4, zorder=4, label="Pareto front")
    if reference is not None:
        ax.axhline(reference, ls="--", color="0.4", lw=1, label=f"float reference ({reference:.4g})")
    if log_y:
        ax.set_yscale("log")
    if y_max is not None:
        ax.set_ylim(top=y_max * (1.15 if log_y else 1.03))
    ax.set_xlabel("bits per weight (overheads included)")
    ax.set_ylabel(f"{quality_key} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title or f"{quality_key} vs bits per weight")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    logger.info(f"Wrote {path}")
    return path
