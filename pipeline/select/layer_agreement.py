"""Do label-free and gradient layer scores rank layers as the probe does? (issue 14, part 4)

Every score is oriented so that higher reads as a better layer (ORIENTATION: higher dataset entropy and
effective rank, as RankMe reads a fuller spectrum as a better representation; lower anisotropy, after
Ethayarajh 2019; higher gradient importance), then compared with the probe's validation score of the
same layers (the score stage's best pooling): Spearman and Kendall correlation, whether the score's top
layer is the probe's best (top-1), and whether the probe's best is among the score's top three (top-3).
The signed correlation of the raw, un-oriented score is kept too, so a reader can judge the orientation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy.stats import kendalltau, spearmanr

from pipeline.select.layer_geometry import ATTENTION_ORIENTATION
from pipeline.select.layer_geometry import ORIENTATION as GEOMETRY_ORIENTATION

ORIENTATION = {**GEOMETRY_ORIENTATION, **ATTENTION_ORIENTATION, "gradient": 1, "input_x_gradient": 1}


def _finite(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)


def agreement(probe: list[float], score: list[float], sign: int = 1) -> dict[str, Any]:
    """One score against the probe over the same layers (index i: the i-th layer of both lists). Layers the
    score does not cover (NaN: attention entropy of the embedding output) are left out of the correlations
    and are never its top layer; the probe's best is still taken over every layer."""
    probe, oriented = np.asarray(probe, float), sign * np.asarray(score, float)
    known = np.isfinite(oriented)
    rho, tau = spearmanr(oriented[known], probe[known]).statistic, kendalltau(oriented[known], probe[known]).statistic
    best = int(np.argmax(probe))
    order = np.argsort(-np.where(known, oriented, -np.inf), kind="stable")
    return {"spearman": _finite(rho), "kendall": _finite(tau), "spearman_raw": _finite(sign * rho),
            "top1": bool(order[0] == best), "top3": bool(best in order[:3]), "score_top": int(order[0]),
            "probe_top": best}


def compare(probe: list[float], layers: list[int], scores: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Every score against the probe; `score_top` and `probe_top` are layer numbers."""
    out = {}
    for name, values in scores.items():
        row = agreement(probe, values, ORIENTATION.get(name, 1))
        row["score_top"], row["probe_top"] = layers[row["score_top"]], layers[row["probe_top"]]
        out[name] = row
    return out


def summarise(agreements: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Across model x corpus (keys of `agreements`): per score, mean Spearman and Kendall, top-1 and top-3
    rates; the score with the highest top-1 rate (ties: mean Spearman) predicts the probe's best layer best."""
    names = sorted({s for per in agreements.values() for s in per})
    table = {}
    for name in names:
        rows = [per[name] for per in agreements.values() if name in per]
        rhos = [r["spearman"] for r in rows if r["spearman"] is not None]
        taus = [r["kendall"] for r in rows if r["kendall"] is not None]
        table[name] = {"cases": len(rows), "mean_spearman": _finite(np.mean(rhos)) if rhos else None,
                       "mean_kendall": _finite(np.mean(taus)) if taus else None,
                       "top1_rate": round(float(np.mean([r["top1"] for r in rows])), 3),
                       "top3_rate": round(float(np.mean([r["top3"] for r in rows])), 3),
                       "negative": sorted(k for k, per in agreements.items()
                                          if (per.get(name) or {}).get("spearman") is not None and per[name]["spearman"] < 0)}
    best = max(table, key=lambda n: (table[n]["top1_rate"], table[n]["mean_spearman"] or -2.0)) if table else None
    return {"table": table, "best": best}


def layer_scores(bank, probe_rows: list[dict[str, Any]], importance_rows: int, seed: int,
                 attention: tuple[list[float], int] | None = None) -> dict[str, Any]:
    """The score stage's extra entries for its best pooling's bank (`pipeline.select.scoring.LayerBank`): label-free
    scores of its sampled raw train rows, gradient importance of its projected layers, their agreement with
    the probe's rows of that pooling, and the seconds all this took. Empty where the bank kept nothing.
    `attention`: the store's mean attention entropy per layer and its row count
    (layer_geometry.mean_attention_entropy), compared as one more label-free score."""
    from pipeline.select.layer_geometry import LEFT_OUT, layer_geometry
    from pipeline.select.layer_importance import layer_importance
    start = time.perf_counter()
    if bank is None or (not bank.samples and not importance_rows):
        return {}
    if {r["pooling"] for r in probe_rows} != {bank.pooling}:
        raise ValueError(f"layer scores of pooling {bank.pooling} against probe rows of another pooling")
    probe = {r["layer"]: r["score"] for r in probe_rows}
    geometry = layer_geometry(bank.samples, seed) if bank.samples else {}
    geometry_s = time.perf_counter() - start
    importance = layer_importance(bank.F, bank.folds, importance_rows, seed) if importance_rows else {}
    entropy = {"attention_entropy": [attention[0][layer] for layer in bank.layers]} if attention else {}
    return {"geometry": geometry, "importance": importance, "attention": entropy,
            "layer_agreement": compare([probe[layer] for layer in bank.layers], bank.layers,
                                       {**geometry, **entropy, **importance}),
            "layer_scores": {"pooling": bank.pooling, "layers": bank.layers,
                             "geometry_rows": len(bank.samples[0]) if bank.samples else 0,
                             "importance_rows": importance_rows, "orientation": ORIENTATION, "left_out": LEFT_OUT,
                             "attention_entropy_rows": attention[1] if attention else 0,
                             "geometry_seconds": round(geometry_s, 3), "seconds": round(time.perf_counter() - start, 3)}}
