"""The answer first: which configuration to deploy, what it scores on test, what it beats and what it costs.

Built from the train stage's results (the head chosen on validation, its test figures read once) and the cost
stage's timings; the report opens with it and `predict` prints its one-line summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.heads.cost import deepest_layers, estimate_seconds, pareto_front
from pipeline.report.plots import plot_cost_front
from pipeline.core.records import CostResult, HeadResult, chosen_on_validation
from pipeline.select.significance import p_clause


def inputs_in_words(groups: list[dict[str, Any]]) -> str:
    """'smollm2-135m last-pooled layers 16, 17 (concat) + minilm-l6 mean-pooled layer 6'."""
    parts = []
    for group in groups:
        layers = group["layers"]
        many = len(layers) > 1
        parts.append(f"{group['model']} {group['pooling']}-pooled layer{'s' if many else ''} "
                     f"{', '.join(map(str, layers))}" + (f" ({group.get('operator', 'concat')})" if many else ""))
    return " + ".join(parts)


def blocks_in_words(deepest: dict[str, int], curves: dict[str, dict[str, Any]] | None) -> str:
    """'smollm2-135m 23 of 30 blocks, minilm-l6 6 of 6'."""
    return ", ".join(f"{model} {depth}" + (f" of {curves[model]['num_layers'] - 1}" if curves and model in curves else "")
                     + " blocks" for model, depth in deepest.items())


def _interval(low: float | None, high: float | None) -> str:
    return "" if low is None else f" [{low:.3f}, {high:.3f}]"


def versus_last_layer(result: HeadResult) -> str:
    test = result.paired_tests.get("last layer")
    if test is None:
        return "it is a last layer itself"
    return (f"{100 * test['diff']:+.1f} points [{100 * test['low']:+.1f}, {100 * test['high']:+.1f}] "
            f"vs {test['against']} ({p_clause(test)})")


def head_seconds(result: HeadResult, cost: CostResult | None) -> tuple[float | None, str]:
    """Seconds per 1,000 texts of a head's predict path: measured when it runs the models as far as the
    configuration the cost stage timed whole (the head itself is a few small matmuls), else estimated from
    the per-depth costs; (None, why) without a cost stage."""
    if cost is None:
        return None, "cost not measured (run stage cost)"
    if deepest_layers(result.groups) == cost.check["deepest"]:
        return cost.check["measured_seconds_per_1000"], "measured"
    return estimate_seconds(result.groups, cost.curves), "estimated from per-depth timings"


def summary_line(dataset: str, result: HeadResult, cost: CostResult | None) -> str:
    """One line: the head, its test figures, its gain over the last layer, what it runs and what it costs."""
    seconds, how = head_seconds(result, cost)
    price = (f"{seconds:.2f} s per 1,000 texts ({how}, {cost.machine})" if seconds is not None else how)
    return (f"{dataset}: {result.row} / {result.head}: test accuracy {result.test_accuracy:.3f}"
            f"{_interval(result.test_accuracy_low, result.test_accuracy_high)}, macro-F1 {result.test_macro_f1:.3f}"
            f"{_interval(result.test_macro_f1_low, result.test_macro_f1_high)}; {versus_last_layer(result)}; "
            f"runs {blocks_in_words(deepest_layers(result.groups), cost.curves if cost else None)}; {price}")


def recommendation_section(dataset: str, results: list[HeadResult], cost: CostResult | None,
                           figures: Path) -> list[str]:
    """The report's opening lines for one dataset, and the cost figure."""
    result = chosen_on_validation(results)
    lines = [f"### {dataset}", "",
             f"**Use {result.row} with the `{result.head}` head**: {inputs_in_words(result.groups)}. Chosen on "
             f"validation (accuracy {result.validation_accuracy:.4f}); test read once, after training.", "",
             f"- Test accuracy {result.test_accuracy:.4f}{_interval(result.test_accuracy_low, result.test_accuracy_high)}"
             f", macro-F1 {result.test_macro_f1:.4f}{_interval(result.test_macro_f1_low, result.test_macro_f1_high)} "
             f"(95% intervals over test rows, mean of {len(result.seeds)} seeds).",
             f"- Against the last layer: {versus_last_layer(result)}."]
    if cost is None:
        return lines + ["- Cost not measured: run stage cost (`dvc repro`).", ""]
    seconds, how = head_seconds(result, cost)
    check = cost.check
    error = check["estimated_seconds_per_1000"] / check["measured_seconds_per_1000"] - 1
    lines.append(f"- At predict time it runs {blocks_in_words(deepest_layers(result.groups), cost.curves)}: "
                 f"**{seconds:.2f} s per 1,000 texts**, {how}, through `predict`'s own feature path on {cost.texts} "
                 f"validation texts (median of {cost.repeats}) on {cost.machine}, device {cost.device}. The per-depth "
                 f"estimate of the fuse stage's choice, {check['estimated_seconds_per_1000']:.2f} s, is {error:+.0%} "
                 f"off its measurement, {check['measured_seconds_per_1000']:.2f} s.")
    choice, cheapest = cost.choice, cost.cheapest
    share = cheapest.seconds_per_1000 / choice.seconds_per_1000 if choice.seconds_per_1000 else float("nan")
    lines.append(
        f"- Cheapest configuration within one paired standard error of the top probe score: **{cheapest.candidate}** "
        f"(probe {cheapest.score:.4f}, {100 * (cheapest.vs_leader or 0):+.2f} ± "
        f"{100 * (cheapest.vs_leader_se or 0):.2f} points to the top), {cheapest.seconds_per_1000:.2f} s per 1,000 texts, {share:.0%} of the fuse stage's choice "
        f"{choice.candidate} ({choice.seconds_per_1000:.2f} s, estimated). On test, the probe refitted on train "
        f"(reported, not used to choose): accuracy {cost.cheapest_test['test_accuracy']:.4f}, macro-F1 "
        f"{cost.cheapest_test['test_macro_f1']:.4f}, against {cost.choice_test['test_accuracy']:.4f} and "
        f"{cost.choice_test['test_macro_f1']:.4f} for the choice.")
    lines += ["", f"`predict` prints: `{summary_line(dataset, result, cost)}`", ""]
    return lines + cost_front(dataset, cost, figures)


def cost_front(dataset: str, cost: CostResult, figures: Path) -> list[str]:
    """The Pareto front of probe score against predict cost, as a table and a figure of every candidate."""
    candidates = cost.candidates
    costs, scores = [c.seconds_per_1000 for c in candidates], [c.score for c in candidates]
    front = pareto_front(costs, scores)
    lines = [f"Pareto front of the {len(candidates)} fusion candidates: none is both cheaper and better on the "
             "probe (cost estimated from the per-depth timings).", "",
             "| candidate | probe score | vs top (paired SE), points | s per 1,000 texts |", "|---|---|---|---|"]
    lines += [f"| {candidates[i].candidate} | {candidates[i].score:.4f} | {100 * (candidates[i].vs_leader or 0):+.2f} "
              f"({100 * (candidates[i].vs_leader_se or 0):.2f}) | {candidates[i].seconds_per_1000:.2f} |" for i in front]
    index = {c.candidate: i for i, c in enumerate(candidates)}
    name = f"{dataset}_cost_front.png"
    plot_cost_front(figures / name, costs, scores, [c.vs_leader_se or 0.0 for c in candidates], front,
                    {"fuse stage's choice": index[cost.choice.candidate],
                     "cheapest within one SE": index[cost.cheapest.candidate]},
                    f"{dataset}: probe score against predict cost ({len(candidates)} candidates)")
    return lines + ["", f"![probe score against predict cost]({figures.name}/{name})", ""]
