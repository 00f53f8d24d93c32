"""Train the heads on the chosen fusions and the baselines, several seeds each, test once at the end.

What gets trained, per dataset (from the fuse stage's `chosen.json`):
  per model:  last layer | best single layer | best within-model fusion | LLMEmbed recipe (last N, mean)
              and, for the scalar_mix head, all layers of the model;
  across:     the best multi-model fusion, and LLMEmbed's co-occurrence head on its inputs
              (each decoder's last N layers + each encoder's last layer).
Early stopping and the reported validation score use the validation split; the test split is
evaluated once, after training, with the weights of the best validation epoch.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from safetensors.torch import save as safetensors_bytes

from pipeline.atomic import write_bytes_atomic, write_json_atomic
from pipeline.datamodule import LayerCache, LayerDataModule
from pipeline.devices import lightning_accelerator
from pipeline.config import TrainSettings
from pipeline.heads import HeadModule, build_net
from pipeline.probe import metrics
from pipeline.significance import TestRows, add_test_uncertainty

FUSED_HEADS = ("linear", "mlp")
TEST_PREDICTIONS = "_test_predictions"      # kept in memory for the paired tests, saved beside each head


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


def plan_runs(chosen: dict[str, Any], heads: list[str]) -> list[dict[str, Any]]:
    """The rows of the report table and the heads trained on each, identical inputs trained once."""
    rows: list[dict[str, Any]] = []
    fused = [h for h in heads if h in FUSED_HEADS]
    for model, info in chosen["models"].items():
        for key, label in (("last", "last layer"), ("best_layer", "best single layer"),
                           ("best_fusion", "best within-model fusion"), ("llmembed", "LLMEmbed recipe")):
            rows.append({"row": f"{model}: {label}", "kind": key, "groups": info[key]["groups"],
                         "probe": info[key], "heads": fused})
        if "scalar_mix" in heads:
            groups = [{"model": model, "pooling": info["pooling"], "layers": list(range(info["num_layers"])),
                       "operator": "concat"}]
            rows.append({"row": f"{model}: all layers", "kind": "all_layers", "groups": groups, "probe": None,
                         "heads": ["scalar_mix"]})
    if chosen.get("best_multi"):
        rows.append({"row": "multi-model: best fusion", "kind": "best_multi", "groups": chosen["best_multi"]["groups"],
                     "probe": chosen["best_multi"], "heads": fused})
    if "cooccurrence" in heads:
        groups = []
        for model, info in chosen["models"].items():
            layers = info["llmembed"]["groups"][0]["layers"] if info["decoder"] else [info["num_layers"] - 1]
            groups.append({"model": model, "pooling": info["pooling"], "layers": layers, "operator": "concat"})
        rows.append({"row": "LLMEmbed inputs (co-occurrence)", "kind": "cooccurrence", "groups": groups,
                     "probe": None, "heads": ["cooccurrence"]})
    return rows


class BestWeights(Callback):
    """Keeps the weights of the best validation epoch in memory (no checkpoint files)."""

    def __init__(self, monitor: str = "val_loss"):
        self.monitor, self.best, self.state, self.epoch, self.val_accuracy = monitor, float("inf"), None, -1, None

    def on_validation_end(self, trainer, module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) < self.best:
            self.best, self.epoch = float(value), trainer.current_epoch
            self.state = copy.deepcopy(module.net.state_dict())


def resolve_accelerator(device: str) -> str:
    """Lightning's accelerator for train.device; a GPU this machine lacks is a ConfigError naming the key."""
    return lightning_accelerator(device, "train.device")


@torch.no_grad()
def predict(net: torch.nn.Module, rows, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and labels of every row of a FusedRows, in order, one batch at a time."""
    net.eval()
    device = next(net.parameters()).device
    preds, labels = [], []
    for x, y in rows.batches(batch_size):
        preds.append(net(x.to(device)).argmax(-1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def fit_head(cache: LayerCache, run: dict[str, Any], head: str, seed: int, settings: dict[str, Any],
             out_dir: Path, label_names: list[str], decoders: dict[str, bool], root_dir: Path) -> dict[str, Any]:
    """Train one head with one seed; save model.safetensors + config.json + standardisation.safetensors."""
    quiet_lightning()
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    inputs, groups = spec_from_groups(run["groups"])
    data = LayerDataModule(cache, inputs, settings["batch_size"], seed)
    data.setup()
    config = {"head": head, "row": run["row"], "inputs": [list(i) for i in inputs], "input_dims": data.input_dims,
              "groups": groups, "decoder": [decoders[m] for m, _, _ in inputs], "label_names": label_names,
              "options": dict(settings.get(head, {})) if head in ("mlp", "cooccurrence", "scalar_mix") else {},
              "standardisation": "standardisation.safetensors", "seed": seed,
              "training": {k: settings[k] for k in ("max_epochs", "patience", "batch_size", "lr", "weight_decay")},
              # what predict and export check the current stores against (a rebuilt store makes the head stale)
              "store_fingerprints": {m: cache.store(m).attrs["fingerprint"] for m in dict.fromkeys(i[0] for i in inputs)}}
    net = build_net(config)
    module = HeadModule(net, settings["lr"], settings["weight_decay"])
    best = BestWeights("val_loss")
    trainer = L.Trainer(max_epochs=settings["max_epochs"], accelerator=resolve_accelerator(settings["device"]),
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root_dir), num_sanity_val_steps=0,
                        callbacks=[EarlyStopping("val_loss", patience=settings["patience"], mode="min"), best])
    trainer.fit(module, datamodule=data)
    net.load_state_dict(best.state)
    net = net.cpu()
    train_seconds = time.perf_counter() - start
    validation = metrics(*predict(net, data.rows("validation")), len(label_names))
    test_pred, test_y = predict(net, data.rows("test"))                  # the only look at test, after training
    test = metrics(test_pred, test_y, len(label_names))
    config.update({"validation": validation, "test": test, "best_epoch": best.epoch,
                   "epochs": trainer.current_epoch + 1, "seconds": round(train_seconds, 3)})
    if head == "scalar_mix":
        config["layer_weights"] = [round(float(w), 6) for w in net.weights().detach()]
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    write_bytes_atomic(out_dir / "model.safetensors", safetensors_bytes(weights))
    write_bytes_atomic(out_dir / "standardisation.safetensors", safetensors_bytes(data.standardisation()))
    write_bytes_atomic(out_dir / "test_predictions.safetensors",
                       safetensors_bytes({"predictions": test_pred.to(torch.int32), "labels": test_y.to(torch.int32)}))
    write_json_atomic(out_dir / "config.json", config)
    return {**config, TEST_PREDICTIONS: test_pred.numpy()}


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


def train_dataset(store_root: Path, dataset: str, chosen: dict[str, Any], settings: dict[str, Any],
                  out_root: Path) -> dict[str, Any]:
    """Every planned (row, head) with every seed; returns the results table written to results.json."""
    start = time.perf_counter()
    resolve_accelerator(settings["device"])        # refuse a missing GPU before reading anything
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    cache = LayerCache(store_root, dataset)
    label_names = cache.store(next(iter(chosen["models"]))).label_names
    decoders = {m: bool(info["decoder"]) for m, info in chosen["models"].items()}
    runs = plan_runs(chosen, settings["heads"])
    # every layer any run needs, read once into one tensor per (model, pooling, split); test comes later
    cache.load([i for run in runs for i in spec_from_groups(run["groups"])[0]], ("train", "validation"))
    done: dict[tuple[str, str], dict[str, Any]] = {}
    results, predictions = [], {}
    for run in runs:
        key_inputs = json.dumps(run["groups"], sort_keys=True)
        for head in run["heads"]:
            key = (key_inputs, head)
            if key not in done:
                folder = out_root / slug(run["row"]) / head
                configs = [fit_head(cache, run, head, seed, settings, folder / f"seed{seed}", label_names, decoders,
                                    out_root / ".trainer") for seed in settings["seeds"]]
                done[key] = {**summarise(configs), "folder": str(folder.relative_to(out_root)),
                             TEST_PREDICTIONS: np.stack([c[TEST_PREDICTIONS] for c in configs])}
            results.append({"row": run["row"], "kind": run["kind"], "head": head, "groups": run["groups"],
                            "probe_score": run["probe"]["score"] if run["probe"] else None,
                            "probe_std": run["probe"]["std"] if run["probe"] else None,
                            **{k: v for k, v in done[key].items() if k != TEST_PREDICTIONS}})
            predictions[(run["row"], head)] = done[key][TEST_PREDICTIONS]
    first_model = next(iter(chosen["models"]))
    add_test_uncertainty(results, predictions, TestRows(cache.labels(first_model, "test").numpy(), len(label_names),
                                                        seed=int(settings["seeds"][0])))
    return {"dataset": dataset, "results": results, "bytes_read": cache.bytes_read,
            "seconds": round(time.perf_counter() - start, 3), "settings": settings}
