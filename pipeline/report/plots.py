"""Figures and the per-layer CSV, written atomically: used by the score stage, the report and the
study report, so that no stage needs the report module to draw."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.core.atomic import write_bytes_atomic, write_text_atomic  # noqa: E402


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    """Every figure's common ending: labels, title, light grid, legend, then the atomic PNG write."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    _save(fig, path)


def write_layer_csv(path: Path, result: dict[str, Any]) -> None:
    """Wide table for `dvc plots`: one row per layer; `score` is the best pooling's, then one column per pooling."""
    poolings = list(dict.fromkeys(r["pooling"] for r in result["rows"]))
    table: dict[int, dict[str, Any]] = {}
    for row in result["rows"]:
        entry = table.setdefault(row["layer"], {"layer": row["layer"], "relative_depth": row["relative_depth"]})
        entry[row["pooling"]] = round(row["score"], 5)
    buffer = io.StringIO()
    for entry in table.values():
        entry["score"] = entry[result["best_pooling"]]
    writer = csv.DictWriter(buffer, ["layer", "relative_depth", "score", *poolings], lineterminator="\n")
    writer.writeheader()
    writer.writerows(table[k] for k in sorted(table))
    write_text_atomic(path, buffer.getvalue())


def plot_layer_scores(path: Path, results: dict[str, dict[str, Any]], title: str, best_pooling_only: bool = False) -> None:
    """Score against relative depth: one line per pooling (one model) or per model (overlay)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for model, result in results.items():
        poolings = [result["best_pooling"]] if best_pooling_only else list(dict.fromkeys(r["pooling"] for r in result["rows"]))
        for pooling in poolings:
            rows = sorted((r for r in result["rows"] if r["pooling"] == pooling), key=lambda r: r["layer"])
            label = f"{model} ({pooling})" if best_pooling_only else pooling
            ax.plot([r["relative_depth"] for r in rows], [r["score"] for r in rows], marker="o", ms=3, label=label)
        best = result["best"]
        ax.scatter([best["relative_depth"]], [best["score"]], s=80, facecolors="none", edgecolors="black", zorder=5)
    metric = next(iter(results.values()))["metric"]
    finish(fig, ax, path, "relative depth (0 = embeddings, 1 = last layer)",
           f"probe {metric} ({next(iter(results.values()))['protocol']['name']})", title)


def plot_layer_weights(path: Path, weights: dict[str, tuple[list[float], list[float]]], title: str) -> None:
    """The scalar-mix head's learned layer weights (mean ± std over seeds), per model."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for model, (mean, std) in weights.items():
        depth = [i / max(len(mean) - 1, 1) for i in range(len(mean))]
        ax.errorbar(depth, mean, yerr=std, marker="o", ms=3, capsize=2, label=model)
    finish(fig, ax, path, "relative depth", "softmax weight", title)


def plot_gate_weights(path: Path, sources: list[str], per_class: dict[str, tuple[list[float], list[float]]],
                      title: str) -> None:
    """The gated head's mean gate weight of each source (mean ± std over seeds), one line per class."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(sources) + 2), 4.2))
    positions = list(range(len(sources)))
    for name, (mean, std) in per_class.items():
        ax.errorbar(positions, mean, yerr=std, marker="o", ms=3, capsize=2, label=name)
    ax.set_xticks(positions, sources, rotation=90, fontsize=7)
    finish(fig, ax, path, "source (model:pooling:layer)", "mean gate weight", title)


def plot_cost_front(path: Path, costs: list[float], scores: list[float], errors: list[float], front: list[int],
                    marked: dict[str, int], title: str) -> None:
    """Probe score against predict cost for every candidate (grey), the Pareto front (with its ± paired SE to
    the top) and the marked configurations (the choice, the cheapest within one SE)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.scatter(costs, scores, s=6, color="0.75", label="candidates")
    ax.errorbar([costs[i] for i in front], [scores[i] for i in front], yerr=[errors[i] for i in front],
                fmt="o-", ms=4, lw=1, capsize=2, color="tab:blue", label="Pareto front (± paired SE to the top)")
    for (label, index), colour in zip(marked.items(), ("tab:red", "tab:green", "tab:purple")):
        ax.scatter([costs[index]], [scores[index]], s=70, marker="*", color=colour, zorder=5, label=label)
    finish(fig, ax, path, "predict cost, seconds per 1,000 texts (this machine)", "probe score", title)
