"""Report sections for the label-free and gradient layer scores beside the probe (issue 14, part 4).

They read the score stage's `layer_agreement`, `geometry`, `attention`, `importance` and `layer_scores` entries
(pipeline/select/layer_agreement.py) and compute only summaries across model x corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.select.layer_agreement import ORIENTATION, summarise
from pipeline.report.plots import finish, plt

EXPLAINED = ("Label-free scores on a seeded sample of train rows of the best pooling (dataset entropy and effective "
             "rank: higher read as better; anisotropy: lower read as better), attention entropy (the mean over the "
             "extraction's sampled train rows of each layer's attention entropy; higher read as better; the embedding "
             "output has none), gradient scores from one linear head over "
             "all layers judged on validation (higher: better). Each is compared, so oriented, with the probe's "
             "validation score of the same layers: Spearman and Kendall; `raw ρ` is Spearman before orientation; "
             "top-1: the score's top layer is the probe's best; top-3: the probe's best is among the score's top three. "
             "Prompt entropy and curvature are left out: they need token states, which the store does not keep.")


def _minmax(values) -> np.ndarray:
    values = np.asarray(values, float)      # NaN (a layer a score does not cover) stays NaN: no point drawn
    if not np.isfinite(values).any():
        return values
    span = np.nanmax(values) - np.nanmin(values)
    return np.where(np.isnan(values), np.nan, 0.0) if span == 0 else (values - np.nanmin(values)) / span


def plot_scores_over_depth(path: Path, result: dict[str, Any], title: str) -> None:
    """The probe and every layer score, min-max normalised and oriented (up: better), over relative depth."""
    info = result["layer_scores"]
    layers = info["layers"]
    depth = [layer / max(result["num_layers"] - 1, 1) for layer in layers]
    probe = {r["layer"]: r["score"] for r in result["rows"] if r["pooling"] == info["pooling"]}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(depth, _minmax([probe[layer] for layer in layers]), color="black", lw=2.5, marker="o", ms=4, label="probe")
    for name, values in {**result.get("geometry", {}), **result.get("attention", {}),
                         **result.get("importance", {})}.items():
        sign = ORIENTATION.get(name, 1)
        ax.plot(depth, _minmax(sign * np.asarray(values)), marker=".", label=name + (" (negated)" if sign < 0 else ""))
    finish(fig, ax, path, "relative depth (0 = embeddings, 1 = last layer)", "min-max normalised (up: better)", title,
           legend_size=7)


def layer_scores_section(scores: dict[str, dict[str, Any]], dataset: str, figures: Path) -> list[str]:
    """Per model on one corpus: each score's agreement with the probe, and the plot over relative depth."""
    present = {m: r for m, r in scores.items() if r and r.get("layer_agreement")}
    if not present:
        return []
    lines = ["### Label-free and gradient layer scores against the probe", "", EXPLAINED, ""]
    for model, result in present.items():
        name = f"{dataset}_{model}_layer_scores.png"
        plot_scores_over_depth(figures / name, result, f"{model} on {dataset} ({result['layer_scores']['pooling']})")
        lines += [f"**{model}** (pooling {result['layer_scores']['pooling']}, probe's best layer "
                  f"{next(iter(result['layer_agreement'].values()))['probe_top']}):", "",
                  "| score | Spearman | Kendall | raw ρ | score's top layer | top-1 | top-3 |", "|---|---|---|---|---|---|---|"]
        for score, row in result["layer_agreement"].items():
            lines.append(f"| {score} | {_num(row['spearman'])} | {_num(row['kendall'])} | {_num(row['spearman_raw'])} | "
                         f"{row['score_top']} | {'yes' if row['top1'] else 'no'} | {'yes' if row['top3'] else 'no'} |")
        lines += ["", f"![{model} layer scores]({figures.name}/{name})", ""]
    return lines


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def study_layer_scores(study: dict[str, Any], models: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Across model x corpus: which score best predicts the probe's best layer, and where scores disagree."""
    cases = {f"{model} x {dataset}": parts["scores"][model]["layer_agreement"]
             for dataset, parts in study.items() for model in models
             if (parts["scores"].get(model) or {}).get("layer_agreement")}
    if not cases:
        return [], {}
    summary = summarise(cases)
    lines = ["## Do label-free or gradient scores find the probe's best layer?", "", EXPLAINED, "",
             "| score | model x corpus | mean Spearman | mean Kendall | top-1 | top-3 | negative Spearman in |",
             "|---|---|---|---|---|---|---|"]
    for name, row in summary["table"].items():
        lines.append(f"| {name} | {row['cases']} | {_num(row['mean_spearman'])} | {_num(row['mean_kendall'])} | "
                     f"{100 * row['top1_rate']:.0f}% | {100 * row['top3_rate']:.0f}% | {', '.join(row['negative']) or '–'} |")
    best = summary["table"][summary["best"]]
    lines += ["", f"Best predictor of the probe's best layer: **{summary['best']}** (top-1 in {100 * best['top1_rate']:.0f}% "
              f"of {best['cases']} model x corpus, top-3 in {100 * best['top3_rate']:.0f}%, mean Spearman "
              f"{_num(best['mean_spearman'])}).", "", "Where the scores disagree with the probe:", ""]
    lines += disagreements(cases)
    return lines + [""], summary


def disagreements(cases: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One plain line per model x corpus: the probe's best layer, and the scores that rank layers against it or
    put another layer first."""
    lines = []
    for case, per in cases.items():
        probe_top = next(iter(per.values()))["probe_top"]
        against = [f"{n} (ρ {_num(r['spearman'])})" for n, r in per.items() if r["spearman"] is not None and r["spearman"] < 0]
        elsewhere = [f"{n} → layer {r['score_top']}" for n, r in per.items() if not r["top1"]]
        text = f"- {case}: probe's best layer {probe_top}."
        text += f" Ranked against the probe: {', '.join(against)}." if against else " No score ranks layers against the probe."
        text += f" Another top layer: {', '.join(elsewhere)}." if elsewhere else " Every score's top layer is the probe's."
        lines.append(text)
    return lines
