"""The Markdown report and its figures, readable offline (PNG + Markdown, no CDN).

Layer curves are drawn against relative depth (layer / last layer) so that models of different
depth share one axis. The report reads only the stages' result files: it computes nothing new.
The drawing itself lives in pipeline/plots.py, which the score stage uses too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic, write_text_atomic
from pipeline.layer_report import layer_scores_section
from pipeline.plots import plot_layer_scores, plot_layer_weights
from pipeline.significance import verdict


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None and std == std else f"{mean:.{digits}f}"


def _ci(row: dict[str, Any], metric: str) -> str:
    low, high = row.get(f"test_{metric}_low"), row.get(f"test_{metric}_high")
    return "–" if low is None else f"{low:.4f} – {high:.4f}"


def _paired_cell(row: dict[str, Any], against: str) -> str:
    test = row.get("paired_tests", {}).get(against)
    if test is None:
        return "–"
    mark = " *" if test["significant"] else ""
    return f"{100 * test['diff']:+.1f} [{100 * test['low']:+.1f}, {100 * test['high']:+.1f}], p = {test['p_value']:.3f}{mark}"


def heads_section(results: list[dict[str, Any]], metric: str) -> list[str]:
    """The test table: mean ± std over seeds, the 95% interval of the seed mean over test rows, and the paired
    differences (points of accuracy, 95% interval, p) to the model's last layer and best single layer."""
    lines = ["### Heads on test (read once, after training)", "",
             "Mean ± std over seeds; 95% CI: bootstrap over test rows of the seed mean; differences in points of "
             "test accuracy, paired on the same test rows (95% CI, p-value; * significant at 5%, uncorrected).", "",
             f"| inputs | head | probe {metric} (used to choose) | test accuracy | 95% CI | test macro-F1 | 95% CI | "
             f"vs last layer | vs best single layer |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        lines.append(f"| {row['row']} | {row['head']} | {_pm(row['probe_score'], row['probe_std'])} | "
                     f"{_pm(row['test_accuracy'], row['test_accuracy_std'])} | {_ci(row, 'accuracy')} | "
                     f"{_pm(row['test_macro_f1'], row['test_macro_f1_std'])} | {_ci(row, 'macro_f1')} | "
                     f"{_paired_cell(row, 'last layer')} | {_paired_cell(row, 'best single layer')} |")
    lines += ["", "In plain words:", ""]
    for row in results:
        for against, test in row.get("paired_tests", {}).items():
            if row["kind"] == "last":
                continue
            lines.append(f"- {row['row']} ({row['head']}): {verdict(test, against + ' (' + test['against'] + ')')}")
    return lines + [""]


def selection_section(scores: dict[str, dict[str, Any]], chosen: dict[str, Any]) -> list[str]:
    """What the rule chose against the top of each leaderboard, and how much a choice's score drops on rows
    that did not choose it."""
    rule = chosen.get("select_rule", "best")
    lines = ["### Selection", "",
             f"Rule `{rule}` on the {chosen['protocol']} protocol: "
             + ("the simplest candidate within one paired standard error of the top." if rule == "one_se"
                else "the top probe score."), "",
             "| choice | chosen | probe score | vs the leaderboard's top (paired SE) | score on the choosing "
             "half | on the fresh half | drop |", "|---|---|---|---|---|---|---|"]
    for model, info in chosen["models"].items():
        for key, label in (("best_layer", "best layer"), ("best_fusion", "best fusion")):
            pick, optimism = info[key], info.get("optimism", {}).get(label, {})
            lines.append(_selection_row(f"{model}: {label}", pick, optimism))
    for label, key in (("multi-model", "best_multi"), ("overall", "chosen")):
        if chosen.get(key):
            lines.append(_selection_row(label, chosen[key], chosen.get("optimism", {}).get(label, {})))
    lines.append("")
    for model, result in scores.items():
        if "chosen" in result:
            best, pick = result["best"], result["chosen"]
            lines.append(f"- {model}: top layer {best['layer']} ({best['pooling']}, {best['score']:.4f}); rule "
                         f"`{result.get('select_rule')}` picks layer {pick['layer']} ({pick['score']:.4f}, "
                         f"{100 * pick.get('vs_leader', 0):+.1f} ± {100 * pick.get('vs_leader_se', 0):.1f} points vs top); "
                         f"vs last layer {100 * best.get('vs_reference', 0):+.1f} points "
                         f"[{100 * best.get('vs_reference_low', 0):+.1f}, {100 * best.get('vs_reference_high', 0):+.1f}]")
    return lines + [""]


def _selection_row(label: str, pick: dict[str, Any], optimism: dict[str, Any]) -> str:
    drop = (f"{optimism['score_choosing_half']:.4f} | {optimism['score_fresh_half']:.4f} | "
            f"{100 * optimism['drop']:+.1f} ± {100 * optimism['drop_std']:.1f} pts") if optimism else "– | – | –"
    return (f"| {label} | {pick['candidate']} | {pick['score']:.4f} | "
            f"{100 * pick.get('vs_leader', 0):+.1f} ({100 * pick.get('vs_leader_se', 0):.1f}) pts | {drop} |")


def write_report(params, out: Path) -> Path:
    """reports/report.md, reports/figures/*.png and reports/metrics.json for every selected dataset."""
    store = Path(params.store)
    figures = out / "figures"
    lines = ["# Layer scores, fusions and heads", "",
             "Generated by `dvc repro` (stage `report`) from the stage outputs under `store/`. Probe scores are "
             "on the validation split (or CV on train); test numbers come only from the trained heads, "
             "evaluated once after training (mean ± std over seeds).", ""]
    metrics: dict[str, Any] = {}
    timings: list[tuple[str, float]] = []
    for dataset in params.selected_datasets:
        scores = {m: json.loads((store / "scores" / dataset / m / "scores.json").read_text())
                  for m in params.selected_models}
        chosen = json.loads((store / "fusion" / dataset / "chosen.json").read_text())
        leaderboard = json.loads((store / "fusion" / dataset / "leaderboard.json").read_text())
        heads = json.loads((store / "heads" / dataset / "results.json").read_text())
        resources = json.loads((store / "heads" / dataset / "resources.json").read_text())
        metric = chosen["metric"]
        plot_layer_scores(figures / f"{dataset}_layers_all_models.png", scores,
                          f"{dataset}: probe score per layer (best pooling of each model)", best_pooling_only=True)
        for model, result in scores.items():
            plot_layer_scores(figures / f"{dataset}_{model}_layers.png", {model: result}, f"{model} on {dataset}")
        lines += [f"## {dataset}", ""] + heads_section(heads["results"], metric) + selection_section(scores, chosen)
        lines += ["", "### Layers (probe)", "", f"| model | best pooling | best layer | {metric} | last layer | {metric} |",
                  "|---|---|---|---|---|---|"]
        dataset_metrics: dict[str, Any] = {"models": {}}
        for model, result in scores.items():
            best, last = result["best"], result["last"]
            lines.append(f"| {model} | {result['best_pooling']} | {best['layer']} of {result['num_layers'] - 1} | "
                         f"{_pm(best['score'], best['std'])} | {last['layer']} | {_pm(last['score'], last['std'])} |")
            info = chosen["models"][model]
            dataset_metrics["models"][model] = {
                "best_layer": best["layer"], "best_layer_score": round(best["score"], 4),
                "last_layer_score": round(last["score"], 4), "best_fusion_score": round(info["best_fusion"]["score"], 4),
                "llmembed_recipe_score": round(info["llmembed"]["score"], 4)}
        lines += ["", f"![layer scores, all models]({figures.name}/{dataset}_layers_all_models.png)", ""]
        lines += [f"![{m}]({figures.name}/{dataset}_{m}_layers.png)" for m in scores] + [""]
        lines += layer_scores_section(scores, dataset, figures)
        lines += ["### Fusion search (probe, top 10)", "", chosen.get("note", ""), "",
                  f"| rank | candidate | operator | width | {metric} | std |", "|---|---|---|---|---|---|"]
        for rank, row in enumerate(leaderboard[:10], 1):
            lines.append(f"| {rank} | {row['candidate']} | {row['operator']} | {row['width']} | {row['score']:.4f} | "
                         f"{row['std']:.4f} |")
        for model, info in chosen["models"].items():
            lines.append("")
            lines.append(f"- {model}: best single layer {info['best_layer']['candidate']} ({info['best_layer']['score']:.4f}), "
                         f"best within-model fusion {info['best_fusion']['candidate']} ({info['best_fusion']['score']:.4f}), "
                         f"LLMEmbed recipe {info['llmembed']['candidate']} ({info['llmembed']['score']:.4f}); "
                         f"{chosen['timing'][model]['candidates']} candidates at "
                         f"{chosen['timing'][model]['candidates_per_s']} candidates/s")
        if chosen.get("best_multi"):
            lines.append(f"- multi-model: {chosen['best_multi']['candidate']} ({chosen['best_multi']['score']:.4f})")
        lines.append("")
        weights = {r["groups"][0]["model"]: (r["layer_weights"], r["layer_weights_std"])
                   for r in heads["results"] if r["head"] == "scalar_mix"}
        if weights:
            plot_layer_weights(figures / f"{dataset}_scalar_mix_weights.png", weights,
                               f"{dataset}: learned layer weights of the scalar-mix head")
            lines += [f"![scalar mix weights]({figures.name}/{dataset}_scalar_mix_weights.png)", ""]
        lines += ["### Resources", "", "| model | extraction s | tokens/s | peak RSS MB | store MB |", "|---|---|---|---|---|"]
        for model, r in resources.items():
            lines.append(f"| {model} | {r['extraction_seconds']} | {r['tokens_per_s']} | {r['peak_rss_mb']} | "
                         f"{r['store_bytes'] / 1e6:.1f} |")
        lines.append("")
        for model, result in scores.items():
            timings.append((f"score {model} x {dataset}", result.get("stage_seconds", result["seconds"])))
        timings.append((f"fuse {dataset}", chosen.get("stage_seconds", 0.0)))
        timings.append((f"train {dataset}", heads.get("stage_seconds", heads["seconds"])))
        best_head = max(heads["results"], key=lambda r: r["validation_accuracy"])
        dataset_metrics.update({
            "best_multi_score": round(chosen["best_multi"]["score"], 4) if chosen.get("best_multi") else None,
            "chosen_fusion": chosen["chosen"]["candidate"], "chosen_fusion_score": round(chosen["chosen"]["score"], 4),
            "head_chosen_on_validation": f"{best_head['row']} / {best_head['head']}",
            "test_accuracy": round(best_head["test_accuracy"], 4), "test_macro_f1": round(best_head["test_macro_f1"], 4),
            "candidates_per_s": {m: t["candidates_per_s"] for m, t in chosen["timing"].items()}})
        metrics[dataset] = dataset_metrics
    lines += ["## Stage wall time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings] + [""]
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "report.md", "\n".join(lines))
    return out / "report.md"
