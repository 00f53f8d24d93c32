"""Benchmark: which attention kernel makes the forward pass fastest, on short and on long texts.

The evidence behind `extract.attention: auto` (pipeline/attention.py). One model is loaded three
times (sdpa, eager, auto); the same token-budget batches of each corpus (the project's batching,
texts encoded once) run through each, interleaved repeat by repeat; tokens/s is the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from pipeline.bench.common import r, sync

IMPLEMENTATIONS = ("sdpa", "eager", "auto")


def bench_corpus(models: dict[str, Any], tokenizer, texts: list[str], settings, device, repeats: int) -> dict[str, Any]:
    from pipeline.batching import token_budget_batches
    from pipeline.extract import encode
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=settings.max_len)["input_ids"]])
    batches = [encode(tokenizer, [texts[i] for i in rows], settings.max_len, "right", device)
               for rows in token_budget_batches(lengths, settings.token_budget)]
    tokens = sum(b.tokens for b in batches)

    def forward(model) -> None:
        with torch.inference_mode():
            for batch in batches:
                model(**batch.inputs)
        sync(device)

    for model in models.values():   # warm-up
        forward(model)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            forward(model)
            seconds[name].append(time.perf_counter() - start)
    tps = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    widths = [b.inputs["input_ids"].shape[1] for b in batches]
    return {"texts": len(texts), "tokens": tokens, "mean_tokens": r(float(lengths.mean())),
            "batches": len(batches), "median_width": int(np.median(widths)),
            "tokens_per_s": {k: r(v, 4) for k, v in tps.items()},
            "vs_sdpa": {k: r(v / tps["sdpa"]) for k, v in tps.items()}}


def run(params, models: list[str], datasets: list[str], rows: int, repeats: int, device: torch.device) -> dict[str, Any]:
    from pipeline.attention import SHORT_WIDTH
    from pipeline.bench.extraction import corpus_texts, load, prepared_model
    from pipeline.extract import resolve_compute_dtype
    compute_dtype = resolve_compute_dtype(params.extract.compute_dtype, device)
    out: dict[str, Any] = {"short_width": SHORT_WIDTH, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                           "token_budget": params.extract.token_budget, "repeats": repeats, "models": {}}
    for name in models:
        folder = prepared_model(params, name)
        loaded = {impl: load(folder, params, name, device, compute_dtype, impl) for impl in IMPLEMENTATIONS}
        tokenizer = loaded["sdpa"][1]
        variants = {impl: pair[0] for impl, pair in loaded.items()}
        out["models"][name] = {dataset: bench_corpus(variants, tokenizer, corpus_texts(params, dataset)[:rows],
                                                     params.extract, device, repeats)
                               for dataset in datasets}
        del loaded, variants
    return out
