"""Benchmarks 3-5: fusion search vs an sklearn baseline, Lightning head vs a plain torch loop, peak RSS.

Fusion: the project's fast probe (pipeline.select.fusion.BlockScorer on a pipeline.select.scoring LayerBank) under
5-fold CV on a model x dataset store, candidates/s over a seeded sample of the default candidate
space; baseline: sklearn's LogisticRegression fitted per candidate per fold on the same folds and
the same standardised full-width features (mean / max / concatenation of layers), in the same run.
Their ranking agreement over the baseline's candidates is Spearman's rho of the two CV accuracies.

Heads: seconds per epoch of pipeline.heads.networks.HeadModule under a Lightning Trainer (as pipeline/heads/training.py
configures it: no logger, checkpoints or progress bar; a validation pass every epoch) against the same
net, optimiser, batches and validation pass in a plain torch loop. Stage 2 imports are lazy, so the
extraction and store benchmarks run before Stage 2 exists.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.bench.common import REPO, r


def _store(params, model: str, dataset: str):
    from pipeline.store.reader import EmbeddingStore
    return EmbeddingStore(params.embeddings_path(model, dataset))


# -- fusion ----------------------------------------------------------------------------------------
def _sk_features(bank, candidate) -> np.ndarray:
    idx = [bank.layers.index(layer) for layer in candidate.layers]
    Z = bank.Z[:, idx].float()
    if candidate.operator == "max":
        return Z.amax(1).numpy()
    if candidate.operator == "concat":
        return Z.reshape(Z.shape[0], -1).numpy()
    return Z.mean(1).numpy()


def sklearn_cv_accuracy(bank, candidate) -> float:
    """The slow, standard probe: LogisticRegression per fold (same folds as the fast probe)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    X, y, folds = _sk_features(bank, candidate), bank.folds.y.numpy(), bank.folds
    scores = []
    for fit, held in zip(folds.fit, folds.eval):
        model = LogisticRegression().fit(X[np.asarray(fit)], y[np.asarray(fit)])
        scores.append(model.score(X[np.asarray(held)], y[np.asarray(held)]))
    return float(np.mean(scores))


def run_fusion(params, model: str, dataset: str, sample: int, baseline: int, repeats: int,
               pooling: str = "mean") -> dict[str, Any]:
    from scipy.stats import spearmanr

    from pipeline.select.fusion import BlockScorer, Candidate, build_candidates, fuse_settings
    from pipeline.select.probe import protocol_from_params
    from pipeline.select.scoring import load_bank
    store = _store(params, model, dataset)
    protocol = replace(protocol_from_params(params.score), name="cv", folds=5)
    start = time.perf_counter()
    bank = load_bank(store, pooling, protocol, keep_standardised=True, model=model)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    scorer = BlockScorer(bank, protocol)
    setup_s = time.perf_counter() - start
    singles = [Candidate((layer,), "mean", "single") for layer in bank.layers]
    single_scores = [scorer.score(c)["score"] for c in singles]
    ranking = [bank.layers[i] for i in np.argsort(single_scores)[::-1]]
    settings = fuse_settings(params.fuse)
    space = build_candidates(store.num_layers, ranking, settings["top_k"], settings["last_n"], settings["operators"],
                             settings["wide_max_layers"])
    rng = np.random.default_rng(0)
    chosen = [space[i] for i in sorted(rng.choice(len(space), size=min(sample, len(space)), replace=False))]
    times, fast = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        for c in chosen:
            fast[c] = scorer.score(c)["accuracy"]
        times.append(time.perf_counter() - start)
    fast_rate = len(chosen) / statistics.median(times)
    # the baseline's candidates: single layers across depth, then fusions from the sample
    spread = [singles[i] for i in np.linspace(0, len(singles) - 1, max(2, baseline // 2)).round().astype(int)]
    fusions = [c for c in chosen if len(c.layers) > 1][: baseline - len(spread)]
    subset = list(dict.fromkeys(spread + fusions))
    slow, slow_times = {}, []
    for c in subset:
        start = time.perf_counter()
        slow[c] = sklearn_cv_accuracy(bank, c)
        slow_times.append(time.perf_counter() - start)
        fast.setdefault(c, scorer.score(c)["accuracy"])
    slow_rate = len(subset) / sum(slow_times)
    rho = spearmanr([fast[c] for c in subset], [slow[c] for c in subset]).statistic
    return {"model": model, "dataset": dataset, "pooling": pooling, "protocol": "cv, 5 folds",
            "rows": int(len(bank.folds.y)), "layers": len(bank.layers), "dim": store.dim, "rank": protocol.rank,
            "candidate_space": len(space), "sampled": len(chosen), "repeats": repeats,
            "fast_candidates_per_s": r(fast_rate), "fast_samples_s": [r(t) for t in times],
            "bank_load_s": r(load_s), "scorer_setup_s": r(setup_s),
            "whole_space_estimate_s": r(setup_s + len(space) / fast_rate),
            "sklearn_candidates": len(subset), "sklearn_candidates_per_s": r(slow_rate),
            "speedup": r(fast_rate / slow_rate), "spearman": r(float(rho)),
            "pairs": [{"candidate": c.name, "operator": c.operator, "fast": r(fast[c], 4), "sklearn": r(slow[c], 4)}
                      for c in subset]}


# -- heads ------------------------------------------------------------------------------------------
class RowBatches(Dataset):
    """Indexing with a list of rows returns that whole batch (the heads benchmark's plain loader)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, rows):
        return self.x[rows], self.y[rows]


def run_heads(rows: int, val_rows: int, dim: int, epochs: int, repeats: int, batch_size: int = 512) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    from pipeline.heads.networks import HeadModule, mlp
    try:
        from pipeline.heads.training import quiet_lightning
        quiet_lightning()
    except ImportError:
        pass
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, dim, generator=g), torch.randint(0, 2, (rows,), generator=g)
    xv, yv = torch.randn(val_rows, dim, generator=g), torch.randint(0, 2, (val_rows,), generator=g)

    def loaders():
        train, val = RowBatches(x, y), RowBatches(xv, yv)
        gen = torch.Generator().manual_seed(0)
        return (DataLoader(train, sampler=BatchSampler(RandomSampler(train, generator=gen), batch_size, False),
                           batch_size=None),
                DataLoader(val, sampler=BatchSampler(SequentialSampler(val), batch_size, False), batch_size=None))

    torch.manual_seed(0)
    template = mlp(dim, [1024, 256], 2, 0.5)

    def lightning_fit():
        module = HeadModule(copy.deepcopy(template))
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        train, val = loaders()
        trainer.fit(module, train, val)

    def plain_fit():
        module = HeadModule(copy.deepcopy(template))      # same net, loss and optimiser
        net, loss_fn = module.net, module.loss
        optimiser = module.configure_optimizers()
        train, val = loaders()
        for _ in range(epochs):
            net.train()
            for xb, yb in train:
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(net(xb), yb)
                loss.backward()
                optimiser.step()
            net.eval()
            with torch.no_grad():
                for xb, yb in val:
                    logits = net(xb)
                    loss_fn(logits, yb).item(), (logits.argmax(-1) == yb).float().mean().item()

    samples: dict[str, list[float]] = {"lightning": [], "plain": []}
    for _ in range(repeats):
        for name, fn in (("lightning", lightning_fit), ("plain", plain_fit)):
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) / epochs)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"rows": rows, "val_rows": val_rows, "dim": dim, "epochs": epochs, "batch_size": batch_size,
            "net": "mlp [1024, 256], dropout 0.5, AdamW", "repeats": repeats,
            "lightning_s_per_epoch": r(med["lightning"]), "plain_s_per_epoch": r(med["plain"]),
            "ratio": r(med["lightning"] / med["plain"]),
            "samples": {k: [r(t) for t in v] for k, v in samples.items()}}


# -- peak memory: each stage in its own process ----------------------------------------------------
def _child(args: list[str]) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "pipeline.bench", "_rss", *args], cwd=REPO, capture_output=True,
                            text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_memory(params_path: str, model: str, dataset: str, extract_rows: int, extract_model: str) -> dict[str, Any]:
    common = ["--params", params_path, "--dataset", dataset]
    out = {"imports_only": _child(["idle", *common]),
           "extract": _child(["extract", *common, "--model", extract_model, "--rows", str(extract_rows)]),
           "stage2_bank": _child(["bank", *common, "--model", model])}
    bank = out["stage2_bank"]
    if "bytes_read" in bank:
        bank["rss_vs_bytes_read"] = r(bank["peak_rss_mb"] * 2**20 / bank["bytes_read"])
        idle = out["imports_only"].get("peak_rss_mb")
        if idle:
            bank["net_rss_vs_bytes_read"] = r((bank["peak_rss_mb"] - idle) * 2**20 / bank["bytes_read"])
    return out


def rss_child(kind: str, params, model: str | None, dataset: str, rows: int) -> dict[str, Any]:
    """Runs inside the child process: one stage, then its peak RSS."""
    from pipeline.bench.common import peak_rss_mb
    import zarr  # noqa: F401  (the imports every stage pays)
    import pipeline.select.scoring  # noqa: F401
    import transformers  # noqa: F401
    out: dict[str, Any] = {"stage": kind}
    if kind == "bank":
        from pipeline.select.probe import protocol_from_params
        from pipeline.select.scoring import load_bank
        protocol = protocol_from_params(params.score)
        bank = load_bank(_store(params, model, dataset), "mean", protocol, keep_standardised=True, model=model)
        out.update({"bytes_read": int(bank.bytes_read), "protocol": protocol.name, "keep_standardised": True})
    elif kind == "extract":
        import tempfile
        from pathlib import Path

        from pipeline.bench.extraction import corpus_texts, load, prepared_model, run_project
        from pipeline.extract.forward import resolve_compute_dtype
        from pipeline.hidden_states.layer_tap import text_config
        device = torch.device("cpu")
        model_obj, tokenizer = load(prepared_model(params, model), params, model, device,
                                    resolve_compute_dtype(params.extract.compute_dtype, device), params.extract.attention)
        config = text_config(model_obj.config)
        with tempfile.TemporaryDirectory() as tmp:
            run_project(model_obj, tokenizer, corpus_texts(params, dataset)[:rows], params.extract, device, Path(tmp),
                        config.num_hidden_layers + 1, config.hidden_size)
        out.update({"model": model, "rows": rows})
    out["peak_rss_mb"] = r(peak_rss_mb(), 4)
    return out
