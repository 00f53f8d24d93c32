"""Test-set uncertainty of trained heads: 95% intervals and paired tests on the same test rows.

A row of the report is a head trained with several seeds; its test score is the mean over seeds. The
rows are resampled (a bootstrap over test rows, the same resamples for every head), so an interval
covers the sampling of the test set, and the difference of two heads on the same resamples is a paired
bootstrap (Dror et al. 2018). Its p-value is the two-sided shift test: how often the resampled
difference, centred on the observed one, lies as far from it as the observed difference lies from 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.select.probe import METRICS, resampled_metric
from pipeline.select.selection import bootstrap_counts

ALPHA = 0.05


class TestRows:
    """The test labels and shared bootstrap resamples of one dataset's test split."""

    __test__ = False   # not a pytest class

    def __init__(self, y: np.ndarray | torch.Tensor, num_classes: int, resamples: int = 2000, seed: int = 0):
        self.y = torch.as_tensor(np.asarray(y), dtype=torch.long)
        self.num_classes = num_classes
        self.counts = bootstrap_counts(len(self.y), resamples, seed)
        self.full = torch.ones((1, len(self.y)))

    def seed_mean(self, predictions: np.ndarray, counts: torch.Tensor, metric: str) -> torch.Tensor:
        """Mean over seeds ([seeds, rows] predictions) of the metric on each resample given by `counts`."""
        preds = torch.as_tensor(np.asarray(predictions), dtype=torch.long)
        return torch.stack([resampled_metric(p, self.y, counts, self.num_classes, metric) for p in preds]).mean(0)

    def interval(self, predictions: np.ndarray) -> dict[str, float]:
        """Seed-mean test accuracy and macro-F1 with their 95% percentile bootstrap intervals."""
        out = {}
        for metric in METRICS:
            samples = self.seed_mean(predictions, self.counts, metric)
            low, high = torch.quantile(samples, torch.tensor([ALPHA / 2, 1 - ALPHA / 2])).tolist()
            out.update({f"test_{metric}_low": round(low, 5), f"test_{metric}_high": round(high, 5)})
        return out

    def paired(self, a: np.ndarray, b: np.ndarray, metric: str = "accuracy") -> dict[str, Any]:
        """a - b (seed means) on the same test rows: the difference, its 95% interval and p-value."""
        observed = float(self.seed_mean(a, self.full, metric) - self.seed_mean(b, self.full, metric))
        d = self.seed_mean(a, self.counts, metric) - self.seed_mean(b, self.counts, metric)
        low, high = torch.quantile(d, torch.tensor([ALPHA / 2, 1 - ALPHA / 2])).tolist()
        p = float(((d - observed).abs() >= abs(observed)).float().mean()) if observed else 1.0
        return {"metric": metric, "diff": round(observed, 5), "low": round(low, 5), "high": round(high, 5),
                "p_value": round(p, 4), "significant": bool(p < ALPHA), "resamples": int(self.counts.shape[0])}


def p_text(test: dict[str, Any], key: str = "p_value") -> str:
    """A bootstrap p-value as text: none of n resamples as far out reads "< 1/n" (2,000: "< 0.0005"), never 0."""
    p, resamples = test[key], test.get("resamples")
    if resamples and p < 1 / resamples:
        return f"< {1 / resamples:.2g}"
    return f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def p_clause(test: dict[str, Any], key: str = "p_value", label: str = "p") -> str:
    """`p = 0.012`, or `p < 0.0005` where no resample was as far out (never `p = < 0.0005`)."""
    text = p_text(test, key)
    return f"{label} {text}" if text.startswith("<") else f"{label} = {text}"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979): the i-th smallest of m p-values becomes
    max over j <= i of min(1, (m - j + 1) * p_(j)); controls the family-wise error rate."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def add_holm(results: list[dict[str, Any]]) -> None:
    """Give every paired test of a dataset's heads its Holm-adjusted p-value (`p_holm`), the family being all
    the paired tests the report shows for that dataset; `significant` stays the uncorrected 5% verdict."""
    tests = [test for row in results for test in row.get("paired_tests", {}).values()]
    for test, adjusted in zip(tests, holm([t["p_value"] for t in tests])):
        test["p_holm"] = round(adjusted, 4)


def verdict(test: dict[str, Any], against: str) -> str:
    """One plain sentence for a paired test."""
    points = 100 * test["diff"]
    interval = f"{100 * test['low']:+.1f} to {100 * test['high']:+.1f}"
    if not test["significant"]:
        return f"{points:+.1f} points vs {against} (95% CI {interval}, {p_clause(test)}): not significant"
    direction = "better" if points > 0 else "worse"
    holm_note = f", {p_clause(test, 'p_holm', 'Holm-adjusted p')}" if "p_holm" in test else ""
    return (f"{points:+.1f} points vs {against} (95% CI {interval}, {p_clause(test)}{holm_note}): "
            f"significantly {direction}")


SINGLE_MODEL_KINDS = ("last", "best_layer", "best_fusion", "llmembed", "all_layers")
BASELINES = (("last", "last layer"), ("best_layer", "best single layer"))


def best_single_model(results: list[dict[str, Any]], head: str) -> dict[str, Any] | None:
    """The single-model row (best layer or best fusion of one model) with the best validation accuracy for
    this head: chosen on validation, so comparing a multi-model fusion with it reads test once."""
    rows = [r for r in results if r["kind"] in ("best_layer", "best_fusion") and r["head"] == head]
    return max(rows, key=lambda r: r["validation_accuracy"], default=None)


def add_test_uncertainty(results: list[dict[str, Any]], predictions: dict[tuple[str, str], np.ndarray],
                         tests: TestRows) -> None:
    """Give each result row its 95% test intervals and paired tests against its model's last layer and best
    single layer (same head, else linear); a multi-model row also against the best single model."""
    model_of = {r["row"]: r["groups"][0]["model"] for r in results if r["kind"] in SINGLE_MODEL_KINDS}
    kinds = {(model_of.get(r["row"]), r["kind"], r["head"]): r for r in results}
    for row in results:
        mine = predictions[(row["row"], row["head"])]
        row.update(tests.interval(mine))
        reference = best_single_model(results, row["head"]) or best_single_model(results, "linear")
        model = model_of.get(row["row"]) or (model_of[reference["row"]] if reference else None)
        row["paired_tests"] = {}
        for kind, label in BASELINES:
            base = kinds.get((model, kind, row["head"])) or kinds.get((model, kind, "linear"))
            if base is not None and base is not row:
                test = tests.paired(mine, predictions[(base["row"], base["head"])])
                row["paired_tests"][label] = {**test, "against": f"{base['row']} ({base['head']})"}
        if row["kind"] == "best_multi" and reference is not None:
            test = tests.paired(mine, predictions[(reference["row"], reference["head"])])
            row["paired_tests"]["best single model"] = {**test, "against": f"{reference['row']} ({reference['head']})"}
