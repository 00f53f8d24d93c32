"""predict vs full extraction on the same texts: what running only the chosen fusion's models,
layers and poolings saves (texts/s, same process, medians of repeats)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.hidden_states.batching import token_budget_batches
from pipeline.bench.common import median_time
from pipeline.sources.corpora import read_corpus
from pipeline.core.devices import resolve_device
from pipeline.extract.forward import count_tokens, pool_batch
from pipeline.heads.predict import Predictor


def _extract_all(predictor: Predictor, texts: list[str], poolings: tuple[str, ...]) -> None:
    """Every layer of every model the head reads, all poolings: what Stage 1 computes (minus writes)."""
    for use in predictor.uses.values():
        model, tokenizer = predictor.model_for(use)
        settings = predictor.settings_for(use, poolings)
        counts, _ = count_tokens(tokenizer, texts, use.max_len)
        for rows in token_budget_batches(np.minimum(counts, use.max_len), predictor.token_budget):
            pool_batch(model, tokenizer, [texts[r] for r in rows], settings, predictor.device, use.num_layers)


def run(params, dataset: str, rows: int, repeats: int) -> dict:
    predictor = Predictor.from_project(params.store, dataset, embeddings_root=params.embeddings_root, token_budget=params.extract.token_budget,
                                       device="cpu" if not torch.cuda.is_available() else "auto")
    texts = read_corpus(params.data_dir(dataset)).splits["test"].texts[:rows]
    predict_s = median_time(lambda: predictor.predict_proba(texts), repeats)
    extract_s = median_time(lambda: _extract_all(predictor, texts, params.extract.poolings), repeats)
    return {"dataset": dataset, "rows": len(texts), "repeats": repeats, "head": str(predictor.head_dir),
            "fusion": predictor.describe(), "device": str(resolve_device("auto")),
            "predict_texts_per_s": round(len(texts) / predict_s, 1),
            "extract_all_texts_per_s": round(len(texts) / extract_s, 1),
            "speedup": round(extract_s / predict_s, 2)}
