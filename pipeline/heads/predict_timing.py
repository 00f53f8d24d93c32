"""Timing the predict path on this machine: each model's cost curve over depth, and one configuration whole.

Each model is timed at a few depths on the dataset's validation texts (the median of repeats, after a warm-up
pass) through the same function predict computes its vectors with; the fuse stage's choice is timed the same
way at its own layers and poolings, so that the curves' estimate (pipeline/heads/cost.py), which prices every
configuration and every head without running a model again, is checked against a measurement.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.config.sections import CostSettings, ModelSpec
from pipeline.heads.cost import fit_curve
from pipeline.core.machine import median_time
from pipeline.sources.models import load_model
from pipeline.heads.predict import model_features, model_use


def measured_depths(num_blocks: int, points: int) -> list[int]:
    """`points` depths from 0 (the embeddings alone) to the last block, evenly spaced, each once."""
    return sorted({int(round(d)) for d in np.linspace(0, num_blocks, max(2, points))})


def median_seconds_per_1000(run: Callable[[], Any], texts: int, repeats: int) -> float:
    """One warm-up call, then the median of `repeats` timed calls, per 1,000 texts."""
    return round(1000 * median_time(run, repeats) / texts, 4)


def model_cost_curve(store, model: str, models_root: Path, texts: list[str], settings: CostSettings,
                     device: torch.device, token_budget: int, check: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """One model's predict-path seconds per 1,000 texts at `settings.depths` depths (mean pooling, the store's
    compute dtype, attention kernel and max_len), and the line fitted through them; with `check` (pooling ->
    layers, what one configuration reads of this model) also that configuration's seconds."""
    use = model_use(store, model, models_root)
    loaded, tokenizer = load_model(use.folder, ModelSpec(name=model, source="local", path=str(use.folder)),
                                   str(device), getattr(torch, use.compute_dtype), use.attention)
    depths = measured_depths(use.num_layers - 1, settings.depths)
    seconds = []
    for depth in depths:
        at_depth = replace(use, layers={"mean": [depth]})
        seconds.append(median_seconds_per_1000(
            lambda: model_features(loaded, tokenizer, at_depth, texts, device, token_budget), len(texts),
            settings.repeats))
    checked = {}
    if check:
        at_layers = replace(use, layers={pooling: sorted(layers) for pooling, layers in check.items()})
        checked["check_seconds_per_1000"] = median_seconds_per_1000(
            lambda: model_features(loaded, tokenizer, at_layers, texts, device, token_budget), len(texts), settings.repeats)
    return {"num_layers": use.num_layers, "compute_dtype": use.compute_dtype, "depths": depths,
            "seconds_per_1000": seconds, **fit_curve(depths, seconds), **checked}
