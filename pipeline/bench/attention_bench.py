"""Benchmark: the forward pass alone, by attention kernel and by token budget.

The evidence behind `extract.attention: auto` (pipeline/hidden_states/attention.py) and `extract.token_budget`.
Attention: one model is loaded three times (sdpa, eager, auto); the same token-budget batches of each
corpus (the project's batching, texts encoded once) run through each, interleaved repeat by repeat.
Budgets: the configured attention on the first corpus, batched under each budget. tokens/s is the
median over repeats.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from pipeline.hidden_states.attention import ATTENTIONS
from pipeline.bench.common import r, sync

def _batches(tokenizer, texts: list[str], settings, budget: int, device) -> tuple[np.ndarray, list]:
    from pipeline.hidden_states.batching import token_budget_batches
    from pipeline.extract.forward import PositionRule, encode
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=settings.max_len)["input_ids"]])
    return lengths, [encode(tokenizer, [texts[i] for i in rows], settings.max_len, "right", device,
                                    PositionRule())   # right padding: the model numbers positions itself
                     for rows in token_budget_batches(lengths, budget)]


def _tokens_per_s(runs: dict[str, tuple[Any, list]], device, repeats: int) -> dict[str, float]:
    """runs: label -> (model, batches); each label's forward passes timed, interleaved, median."""
    def forward(model, batches) -> None:
        with torch.inference_mode():
            for batch in batches:
                model(**batch.inputs)
        sync(device)

    for model, batches in runs.values():   # warm-up
        forward(model, batches)
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, (model, batches) in runs.items():
            start = time.perf_counter()
            forward(model, batches)
            seconds[label].append(time.perf_counter() - start)
    return {label: sum(b.tokens for b in runs[label][1]) / statistics.median(s) for label, s in seconds.items()}


def bench_budgets(model, tokenizer, texts: list[str], settings, device, repeats: int, budgets) -> dict[str, Any]:
    runs = {str(b): (model, _batches(tokenizer, texts, settings, b, device)[1]) for b in budgets}
    tps = _tokens_per_s(runs, device, repeats)
    return {"texts": len(texts), "tokens_per_s": {k: r(v, 4) for k, v in tps.items()},
            "vs_configured": {k: r(v / tps[str(settings.token_budget)]) for k, v in tps.items()}
            if str(settings.token_budget) in tps else {}}


def bench_corpus(models: dict[str, Any], tokenizer, texts: list[str], settings, device, repeats: int) -> dict[str, Any]:
    lengths, batches = _batches(tokenizer, texts, settings, settings.token_budget, device)
    tokens = sum(b.tokens for b in batches)
    tps = _tokens_per_s({name: (model, batches) for name, model in models.items()}, device, repeats)
    widths = [b.inputs["input_ids"].shape[1] for b in batches]
    return {"texts": len(texts), "tokens": tokens, "mean_tokens": r(float(lengths.mean())),
            "batches": len(batches), "median_width": int(np.median(widths)),
            "tokens_per_s": {k: r(v, 4) for k, v in tps.items()},
            "vs_sdpa": {k: r(v / tps["sdpa"]) for k, v in tps.items()}}


BUDGETS = (512, 1024, 2048, 4096)


def run(params, models: list[str], datasets: list[str], rows: int, repeats: int, device: torch.device,
        budget_rows: int = 512, compute_dtype_name: str | None = None) -> dict[str, Any]:
    from pipeline.hidden_states.attention import SHORT_WIDTH
    from pipeline.bench.extraction import corpus_texts, load, prepared_model
    from pipeline.extract.forward import resolve_compute_dtype
    compute_dtype = resolve_compute_dtype(compute_dtype_name or params.extract.compute_dtype, device)
    out: dict[str, Any] = {"short_width": SHORT_WIDTH, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                           "token_budget": params.extract.token_budget, "repeats": repeats, "models": {},
                           "attention": params.extract.attention, "budget_corpus": datasets[0], "budgets": {}}
    for name in models:
        folder = prepared_model(params, name)
        loaded = {impl: load(folder, params, name, device, compute_dtype, impl) for impl in ATTENTIONS}
        tokenizer = loaded["sdpa"][1]
        variants = {impl: pair[0] for impl, pair in loaded.items()}
        out["models"][name] = {dataset: bench_corpus(variants, tokenizer, corpus_texts(params, dataset)[:rows],
                                                     params.extract, device, repeats)
                               for dataset in datasets}
        ours = variants[params.extract.attention]
        out["budgets"][name] = bench_budgets(ours, tokenizer, corpus_texts(params, datasets[0])[:budget_rows],
                                             params.extract, device, repeats,
                                             [b for b in BUDGETS if b >= params.extract.max_len])
        del loaded, variants, ours
    return out
