"""Evaluation pictures drawn from what :func:`upreid.evaluation.evaluate` returns: the CMC curve
(``cmc.png``) and the distributions of positive and negative distances (``distances.png``, from
the ``distances`` histograms that ``evaluate(..., distance_bins=N)`` adds). One curve per result
(e.g. without and with re-ranking). matplotlib is imported lazily, without pyplot's global state."""
from __future__ import annotations

import logging
import os

from upreid.utils.deps import MissingDependencyError

log = logging.getLogger("upreid.evaluation")
CMC_NAME, DISTANCES_NAME = "cmc.png", "distances.png"
LABELS = {"plain": "without re-ranking", "rerank": "with re-ranking"}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("evaluation plots need matplotlib: pip install matplotlib (in requirements.txt)") from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_cmc(path: str, results: dict, title: str | None = None) -> str:
    """CMC curves (rank 1..len(cmc), matching rate in %) of ``results`` ({label: result})."""
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    for label, r in results.items():
        cmc = [100.0 * v for v in r["cmc"]]
        ax.plot(range(1, len(cmc) + 1), cmc, marker="o" if len(cmc) <= 20 else None, markersize=3,
                label=f"{LABELS.get(label, label)}: Rank-1 {cmc[0]:.1f}%, mAP {100 * r['mAP']:.1f}%")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100.5)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "CMC")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_distances(path: str, results: dict, title: str | None = None) -> str:
    """Positive and negative distance distributions (each normalised to unit area), one panel per
    result that carries ``distances``."""
    panels = {k: r["distances"] for k, r in results.items() if "distances" in r}
    if not panels:
        raise ValueError("plot_distances: no result has 'distances'; evaluate with distance_bins > 0")
    fig = _figure(5 * len(panels), 3.6)
    for i, (label, h) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        edges = h["edges"]
        for kind, colour in (("positive", "tab:green"), ("negative", "tab:red")):
            counts = h[kind]
            total = sum(counts)
            if total:
                density = [c / (total * (edges[j + 1] - edges[j])) for j, c in enumerate(counts)]
                ax.stairs(density, edges, fill=True, alpha=0.45, color=colour,
                          label=f"{kind} ({total:,} pairs)")
        ax.set_xlabel("distance")
        ax.set_ylabel("density")
        ax.set_title(LABELS.get(label, label), fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title or "query-gallery distances", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_plots(folder: str, results: dict, title: str | None = None, required: bool = True) -> list:
    """``cmc.png`` and (when the results carry histograms) ``distances.png`` in ``folder``; returns
    the paths written. Without matplotlib: ImportError, or (``required=False``) a warning and []."""
    try:
        _figure(1, 1)
    except ImportError as e:
        if required:
            raise
        log.warning("%s; no plots written", e)
        return []
    os.makedirs(folder, exist_ok=True)
    paths = [plot_cmc(os.path.join(folder, CMC_NAME), results, title)]
    if any("distances" in r for r in results.values()):
        paths.append(plot_distances(os.path.join(folder, DISTANCES_NAME), results, title))
    return paths


def read_metrics(path: str) -> list:
    """The rows of a ``metrics.jsonl`` (training steps and evaluations), in file order; a missing file
    or an unparsable line is an error naming the file and the line."""
    import json
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    return rows


def plot_curves(path: str, runs: dict, keys: dict, title: str | None = None) -> str:
    """Training curves: one panel per ``keys`` entry ({metric key: panel title}), one line per run
    ({label: metrics.jsonl path}), against the step. Rows without the key (evaluations) are skipped."""
    data = {label: read_metrics(p) for label, p in runs.items()}
    fig = _figure(4.2 * len(keys), 3.4)
    for i, (key, name) in enumerate(keys.items()):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for label, rows in data.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            if pts:
                ax.plot(*zip(*pts), label=label, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
