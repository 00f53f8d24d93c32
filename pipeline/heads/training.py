"""Train the heads on the chosen fusions and the baselines, several seeds each, test once at the end.

What gets trained, per dataset (from the fuse stage's `chosen.json`):
  per model:  last layer | best single layer | best within-model fusion | LLMEmbed recipe (last N, mean)
              and, for the scalar_mix and gated heads, all layers of the model;
  across:     the best multi-model fusion, and LLMEmbed's co-occurrence head on its inputs
              (each decoder's last N layers + each encoder's sentence vector, see `llmembed_groups`).
The gated head trains on the inputs of the rows it is compared on: all layers (beside scalar_mix and a
linear head on their concatenation), the best multi-model fusion (beside linear and mlp) and LLMEmbed's
inputs (beside co-occurrence).
Lightning does the bookkeeping: epoch means through `self.log`, early stopping on validation loss,
the best epoch's weights through ModelCheckpoint (a temporary folder, removed after the fit), and
evaluation through `trainer.predict` with those weights; the test split is read once, after training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from safetensors.torch import save as safetensors_bytes

from pipeline.core.atomic import write_bytes_atomic, write_json_atomic
from pipeline.heads.datamodule import LayerCache, LayerDataModule
from pipeline.core.devices import lightning_accelerator
from pipeline.config.sections import TrainSettings
from pipeline.heads.networks import HeadModule, build_net
from pipeline.select.probe import metrics, torch_threads
from pipeline.core.records import HeadResult, HeadResults
from pipeline.heads.comparison import compare_heads, head_settings

FUSED_HEADS = ("linear", "mlp")
LLMEMBED_POOLING = "mean"
"""LLMEmbed's inputs are mean-pooled: its decoder layers (mean over tokens) and the native sentence vector of
sentence-transformers encoders (MiniLM and MPNet pool by the mean); used whatever pooling the probe chose."""
GATE_SPLIT = "validation"       # gate weights per class are read on validation: nothing more is read from test
GATES = "_gate_weights"                     # a gated head's per-class gate weights, gathered into gate_weights.json


def quiet_lightning() -> None:
    """No tips, banners or 'GPU available' lines in stage logs."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*isinstance.*treespec.*")


def train_settings(train: TrainSettings) -> dict[str, Any]:
    """The heads' settings from params.yaml's `train:` section (typed, validated and defaulted by
    pipeline.config), as the dict that fit_head reads and results.json records."""
    return train.as_dict()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80]


def spec_from_groups(groups: list[dict[str, Any]]) -> tuple[list[tuple[str, str, int]], list[dict[str, Any]]]:
    """Fusion groups (model, pooling, layers, operator) -> ordered inputs and groups over their positions."""
    inputs: list[tuple[str, str, int]] = []
    out = []
    for group in groups:
        positions = []
        for layer in group["layers"]:
            item = (group["model"], group["pooling"], int(layer))
            if item not in inputs:
                inputs.append(item)
            positions.append(inputs.index(item))
        out.append({"inputs": positions, "operator": group["operator"] if len(positions) > 1 else "concat"})
    return inputs, out


def llmembed_groups(chosen: dict[str, Any], poolings: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """LLMEmbed's co-occurrence inputs: each decoder's last N layers (fuse.last_n, as in its LLMEmbed recipe
    row) and each encoder's last layer, all mean-pooled; a store without `mean` falls back to the probe's pooling."""
    groups = []
    for model, info in chosen["models"].items():
        layers = info["llmembed"]["groups"][0]["layers"] if info["decoder"] else [info["num_layers"] - 1]
        pooling = LLMEMBED_POOLING if poolings is None or LLMEMBED_POOLING in poolings[model] else info["pooling"]
        groups.append({"model": model, "pooling": pooling, "layers": list(layers), "operator": "concat"})
    return groups


def plan_runs(chosen: dict[str, Any], heads: list[str], poolings: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """The rows of the report table and the heads trained on each, identical inputs trained once.
    `poolings`: the poolings each model's store holds (None: assume LLMEmbed's mean is there)."""
    rows: list[dict[str, Any]] = []
    fused = [h for h in heads if h in FUSED_HEADS]
    gated = ["gated"] if "gated" in heads else []
    for model, info in chosen["models"].items():
        for key, label in (("last", "last layer"), ("best_layer", "best single layer"),
                           ("best_fusion", "best within-model fusion"), ("llmembed", "LLMEmbed recipe")):
            rows.append({"row": f"{model}: {label}", "kind": key, "groups": info[key]["groups"],
                         "probe": info[key], "heads": fused})
        mixes = [h for h in ("scalar_mix", "gated") if h in heads]
        if mixes:
            groups = [{"model": model, "pooling": info["pooling"], "layers": list(range(info["num_layers"])),
                       "operator": "concat"}]
            concat = ["linear"] if gated and "linear" in heads else []    # the gate's baseline on the same inputs
            rows.append({"row": f"{model}: all layers", "kind": "all_layers", "groups": groups, "probe": None,
                         "heads": concat + mixes})
    if chosen.get("best_multi"):
        rows.append({"row": "multi-model: best fusion", "kind": "best_multi", "groups": chosen["best_multi"]["groups"],
                     "probe": chosen["best_multi"], "heads": fused + gated})
    if "cooccurrence" in heads:
        rows.append({"row": "LLMEmbed inputs (co-occurrence)", "kind": "cooccurrence",
                     "groups": llmembed_groups(chosen, poolings), "probe": None, "heads": ["cooccurrence"] + gated})
    return [row for row in rows if row["heads"]]


def resolve_accelerator(device: str) -> str:
    """Lightning's accelerator for train.device; a GPU this machine lacks is a ConfigError naming the key."""
    return lightning_accelerator(device, "train.device")


def evaluate(trainer: L.Trainer, module: HeadModule, data: LayerDataModule,
             splits: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
    """Logits, labels (and gate weights) of every row of each split, in order, with the best epoch's weights
    (restored into the module's net from the checkpoint), in one `trainer.predict`."""
    per_split = trainer.predict(module, dataloaders=[data.eval_dataloader(s) for s in splits], ckpt_path="best")
    per_split = per_split if len(splits) > 1 else [per_split]
    return [{key: torch.cat([b[key] for b in batches]) for key in batches[0]} for batches in per_split]


def gate_weights_per_class(gates: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[float]]:
    """Mean gate weight of each source over the rows of each class ([classes][sources]; a class with no rows: None)."""
    return [[round(float(w), 6) for w in gates[labels == c].mean(0)] if bool((labels == c).any()) else None
            for c in range(num_classes)]


def fit_head(cache: LayerCache, run: dict[str, Any], head: str, seed: int, settings: dict[str, Any],
             out_dir: Path, label_names: list[str], decoders: dict[str, bool], root_dir: Path) -> dict[str, Any]:
    """Train one head with one seed; save model.safetensors + config.json + standardisation.safetensors
    (and gate_weights.json for a gated head)."""
    quiet_lightning()
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    inputs, groups = spec_from_groups(run["groups"])
    data = LayerDataModule(cache, inputs, settings["batch_size"], seed, settings["min_steps_per_epoch"])
    data.setup()
    config = {"head": head, "row": run["row"], "inputs": [list(i) for i in inputs], "input_dims": data.input_dims,
              "groups": groups, "decoder": [decoders[m] for m, _, _ in inputs], "label_names": label_names,
              "options": dict(settings.get(head, {})),     # train.<head> (linear: {})
              "standardisation": "standardisation.safetensors", "seed": seed,
              "training": {**{k: settings[k] for k in ("max_epochs", "patience", "batch_size", "min_steps_per_epoch",
                                                         "lr", "weight_decay")}, "train_batch_size": data.train_batch_size},
              # what predict and export check the current stores against (a rebuilt store makes the head stale)
              "store_fingerprints": {m: cache.store(m).attrs["fingerprint"] for m in dict.fromkeys(i[0] for i in inputs)}}
    net = build_net(config)
    module = HeadModule(net, settings["lr"], settings["weight_decay"])
    with tempfile.TemporaryDirectory(prefix="layerfuse-checkpoints-") as checkpoints:    # never in store/ or reports/
        best = ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", monitor="val_loss", mode="min", save_top_k=1,
                               save_weights_only=True, auto_insert_metric_name=False, enable_version_counter=False)
        trainer = L.Trainer(max_epochs=settings["max_epochs"], accelerator=resolve_accelerator(settings["device"]),
                            devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(root_dir), num_sanity_val_steps=0,
                            callbacks=[EarlyStopping("val_loss", patience=settings["patience"], mode="min"), best])
        trainer.fit(module, datamodule=data)
        train_seconds = time.perf_counter() - start
        validation, test = evaluate(trainer, module, data, ("validation", "test"))   # the only look at test
        best_epoch = int(Path(best.best_model_path).stem)
    net = net.cpu().eval()
    test_pred, test_y = test["logits"].argmax(-1), test["labels"]
    config.update({"validation": metrics(validation["logits"].argmax(-1), validation["labels"], len(label_names)),
                   "test": metrics(test_pred, test_y, len(label_names)), "best_epoch": best_epoch,
                   "epochs": trainer.current_epoch, "seconds": round(train_seconds, 3)})
    if head == "scalar_mix":
        config["layer_weights"] = [round(float(w), 6) for w in net.weights().detach()]
    out_dir.mkdir(parents=True, exist_ok=True)
    gates = None
    if head == "gated":
        gates = {"split": GATE_SPLIT, "sources": config["inputs"], "classes": label_names,
                 "per_class": gate_weights_per_class(validation["gates"], validation["labels"], len(label_names))}
        write_json_atomic(out_dir / "gate_weights.json", gates)
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    files = {"model.safetensors": safetensors_bytes(weights),
             "standardisation.safetensors": safetensors_bytes(data.standardisation())}
    for name, blob in files.items():
        write_bytes_atomic(out_dir / name, blob)
    config["files_sha256"] = {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()}
    write_bytes_atomic(out_dir / "test_predictions.safetensors",
                       safetensors_bytes({"predictions": test_pred.to(torch.int32), "labels": test_y.to(torch.int32)}))
    write_json_atomic(out_dir / "config.json", config)
    return {**config, **({GATES: gates} if gates else {})}


def summarise(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of validation and test accuracy and macro-F1."""
    out: dict[str, Any] = {"seeds": [c["seed"] for c in configs], "seconds": round(sum(c["seconds"] for c in configs), 3)}
    for split in ("validation", "test"):
        for metric in ("accuracy", "macro_f1"):
            values = np.array([c[split][metric] for c in configs])
            out[f"{split}_{metric}"] = float(values.mean())
            out[f"{split}_{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    if "layer_weights" in configs[0]:
        weights = np.array([c["layer_weights"] for c in configs])
        out["layer_weights"] = weights.mean(0).round(6).tolist()
        out["layer_weights_std"] = weights.std(0).round(6).tolist()
    return out


def summarise_gates(row: str, folder: str, configs: list[dict[str, Any]]) -> dict[str, Any]:
    """A gated head's per-class gate weights, mean and std over seeds ([classes][sources] each)."""
    first = configs[0][GATES]
    nan = [float("nan")] * len(first["sources"])
    per_class = np.array([[w if w is not None else nan for w in c[GATES]["per_class"]] for c in configs])
    absent = lambda table: [None if np.isnan(w).any() else w for w in table.round(6).tolist()]   # noqa: E731
    return {"row": row, "folder": folder, "split": first["split"], "sources": first["sources"],
            "classes": first["classes"], "per_class": absent(per_class.mean(0)),
            "per_class_std": absent(per_class.std(0)), "seeds": [c["seed"] for c in configs]}


def head_plan(chosen: dict[str, Any], settings: dict[str, Any], head: str,
              poolings: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """The planned rows that train this head (the plan of every head in `train.heads`, so a gated head's
    comparison rows are the same whichever stage trains them)."""
    return [run for run in plan_runs(chosen, settings["heads"], poolings) if head in run["heads"]]


def train_head(embeddings_root: Path, dataset: str, chosen: dict[str, Any], settings: dict[str, Any], head: str,
               out_root: Path) -> dict[str, Any]:
    """One head type on every row planned for it, every seed (stage train@<dataset>-<head>): the heads under
    out_root/<row>/seed<k>, and the rows as a HeadResults record's JSON, without test intervals or paired
    tests (stage compare adds those across head types). A gated head also writes gate_weights.json."""
    start = time.perf_counter()
    resolve_accelerator(settings["device"])        # refuse a missing GPU before reading anything
    with torch_threads(int(settings.get("threads") or torch.get_num_threads())):   # train.threads, this stage only
        cache = LayerCache(embeddings_root, dataset)
        label_names = cache.store(next(iter(chosen["models"]))).label_names
        decoders = {m: bool(info["decoder"]) for m, info in chosen["models"].items()}
        runs = head_plan(chosen, settings, head, {m: cache.store(m).poolings for m in chosen["models"]})
        # every layer any run needs, read once into one tensor per (model, pooling, split); test comes later
        cache.load([i for run in runs for i in spec_from_groups(run["groups"])[0]], ("train", "validation"))
        done: dict[str, dict[str, Any]] = {}
        results, gates = [], []
        for run in runs:
            key = json.dumps(run["groups"], sort_keys=True)       # identical inputs are trained once
            if key not in done:
                folder = out_root / slug(run["row"])
                configs = [fit_head(cache, run, head, seed, settings, folder / f"seed{seed}", label_names, decoders,
                                    out_root / ".trainer") for seed in settings["seeds"]]
                done[key] = {**summarise(configs), "folder": f"{head}/{slug(run['row'])}"}
                if GATES in configs[0]:
                    gates.append(summarise_gates(run["row"], done[key]["folder"], configs))
            results.append({"row": run["row"], "kind": run["kind"], "head": head, "groups": run["groups"],
                            "probe_score": run["probe"]["score"] if run["probe"] else None,
                            "probe_std": run["probe"]["std"] if run["probe"] else None, **done[key]})
        if gates:
            write_json_atomic(out_root / "gate_weights.json", gates)
        return HeadResults(dataset=dataset, results=[HeadResult(**row) for row in results], bytes_read=cache.bytes_read,
                           seconds=round(time.perf_counter() - start, 3), settings=head_settings(settings, head)).to_json()


def train_dataset(embeddings_root: Path, dataset: str, chosen: dict[str, Any], settings: dict[str, Any],
                  out_root: Path) -> dict[str, Any]:
    """Every head type into out_root/<head>, then their comparison: what stages train and compare do for one
    dataset, in one process (tests, benchmarks). Returns the compared HeadResults JSON."""
    for head in settings["heads"]:
        write_json_atomic(out_root / head / "results.json",
                          train_head(embeddings_root, dataset, chosen, settings, head, out_root / head))
    return compare_heads(out_root, dataset, settings)
