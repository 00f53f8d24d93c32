"""Classify new texts with a trained head, running only what its fusion needs.

Only the models the head reads are loaded; each forward pass stops after the deepest layer used
(layer_tap's `stop_after`); only the poolings used are computed. Vectors go through exactly what the
stored ones went through: same tokenizer and max_len, same compute dtype, rounded to the store's
dtype, standardised with the train statistics saved beside the head. A model whose weights' sha256
differs from the one the head was trained on is refused.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline.hidden_states.attention import TRANSFORMERS_DEFAULT
from pipeline.hidden_states.batching import token_budget_batches
from pipeline.config.sections import ExtractSettings, ModelSpec
from pipeline.core.errors import HeadError, ModelSourceError, PipelineError
from pipeline.core.devices import resolve_device
from pipeline.extract.forward import PoolingSpec, count_tokens, pool_batch, position_rule
from pipeline.core.fingerprint import differences
from pipeline.heads.networks import load_head, load_standardisation, read_head_config, verified_bytes
from pipeline.hidden_states.layer_tap import text_config
from pipeline.sources.models import folder_fingerprint, load_model
from pipeline.core.records import HeadResults, chosen_on_validation, read_record

CHUNK_TEXTS = 2048   # texts per pass: bounds memory on huge inputs, and paces the progress bar


@dataclass
class ModelUse:
    """What one model must compute for a head, and how its stored vectors were made."""
    name: str
    folder: Path
    weights_sha256: str
    num_layers: int                      # L+1, as stored
    max_len: int
    compute_dtype: str
    stored_dtype: dict[str, str]         # pooling -> float16 | float32 (a float16 overflow fell back)
    layers: dict[str, list[int]] = field(default_factory=dict)   # pooling -> layers used
    attention: str = TRANSFORMERS_DEFAULT   # extract.attention (stores from before it existed ran this)
    position_ids_from: int = 0           # the store's extract.position_ids_from: 0 where the key is absent

    @property
    def deepest(self) -> int:
        return max(max(layers) for layers in self.layers.values())

    @property
    def blocks_skipped(self) -> float:
        """Fraction of the transformer blocks this head never needs."""
        return 1 - self.deepest / (self.num_layers - 1)

    def as_dict(self) -> dict[str, Any]:
        return {"weights_sha256": self.weights_sha256, "num_layers": self.num_layers, "max_len": self.max_len,
                "compute_dtype": self.compute_dtype, "stored_dtype": self.stored_dtype, "attention": self.attention,
                "position_ids_from": self.position_ids_from}


def uses_from_store(head_config: dict[str, Any], embeddings_root: Path | str, dataset: str, models_root: Path
                    ) -> dict[str, ModelUse]:
    """How each model of a head's inputs was extracted, read from its store's attributes."""
    from pipeline.store.reader import open_store
    uses: dict[str, ModelUse] = {}
    for model, _, _ in head_config["inputs"]:
        if model in uses:
            continue
        store = open_store(embeddings_root, model, dataset)
        check_head_fits_store(head_config, model, store.attrs["fingerprint"], store.path)
        store.check(sorted({p for m, p, _ in head_config["inputs"] if m == model}))   # what the head learnt from is intact
        uses[model] = model_use(store, model, models_root)
    return uses


def model_use(store, model: str, models_root: Path) -> ModelUse:
    """How one model's stored vectors were computed (no layers yet), from an opened store's attributes."""
    from pipeline.store.format import POSITIONS_KEY, with_legacy_defaults
    extract = with_legacy_defaults(store.attrs["fingerprint"])["extract"]
    fallback = {key.split("/")[1] for key in store.attrs.get("dtype_fallback", {})}
    return ModelUse(model, models_root / model, store.attrs["fingerprint"]["model"]["weights_sha256"],
                    store.num_layers, extract["max_len"], extract["compute_dtype"],
                    {p: "float32" if p in fallback else extract["dtype"] for p in store.poolings},
                    attention=extract["attention"], position_ids_from=extract.get(POSITIONS_KEY, 0))


def check_head_fits_store(head_config: dict[str, Any], model: str, fingerprint: dict[str, Any], where) -> None:
    """Refuse a head whose model store has been rebuilt since training (HeadError naming each changed
    key): its vectors would come out of other settings (another max_len, dtype, corpus...) without a
    word. Heads from before heads recorded the fingerprint are refused too: nothing shows they fit."""
    from pipeline.store.format import with_legacy_defaults
    trained_on = head_config.get("store_fingerprints", {}).get(model)
    if trained_on is None:
        raise HeadError(f"head {head_config.get('row')!r} / {head_config.get('head')!r} records no fingerprint of "
                        f"the {model} store it was trained on (it predates that record); retrain it "
                        f"(dvc repro, stage train) before predict or export")
    changed = differences(with_legacy_defaults(trained_on), with_legacy_defaults(fingerprint),
                          sides=("head trained on", "store now has"))
    if changed:
        raise HeadError(f"head {head_config.get('row')!r} / {head_config.get('head')!r} is stale: the store {where} "
                        f"was rebuilt since it was trained:\n  - " + "\n  - ".join(changed)
                        + "\nRetrain the head (dvc repro, stage train) before predict or export.")


def check_export_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file an export lists has the sha256 export.json records (a HeadError names the first that
    differs); an export from before exports listed them is refused: nothing shows it is intact."""
    listed = manifest.get("files_sha256")
    if listed is None:
        raise HeadError(f"{folder / 'export.json'} lists no sha256 of its files (an export from before exports "
                        f"were verified): export it again")
    for name, digest in listed.items():
        verified_bytes(folder / name, digest, folder / "export.json", what="exported file")


def check_positions(model, use: ModelUse) -> None:
    """Refuse a head whose vectors came from other position ids than the model numbers itself (a store
    written before issue 21's fix fed RoBERTa-style models 0-based positions)."""
    numbered_from = position_rule(model).first
    if numbered_from != use.position_ids_from:
        raise HeadError(f"{use.name} numbers positions from {numbered_from}, but the vectors this head was trained "
                        f"on were computed with position ids from {use.position_ids_from} (a store from before "
                        f"that was fixed): re-extract with --rebuild and retrain the head")


class Predictor:
    """A trained head plus the models it reads; `predict_proba(texts)` -> [N, classes]."""

    def __init__(self, head_dir: Path, uses: dict[str, ModelUse], device: str = "auto", token_budget: int = 1024,
                 check_weights: bool = True):
        self.head_dir = Path(head_dir)
        self.net, self.config = load_head(self.head_dir)
        self.mean, self.std = load_standardisation(self.head_dir)
        self.label_names = list(self.config["label_names"])
        self.inputs = [(m, p, int(l)) for m, p, l in self.config["inputs"]]
        self.uses = uses
        for model, pooling, layer in self.inputs:
            uses[model].layers.setdefault(pooling, [])
            if layer not in uses[model].layers[pooling]:
                uses[model].layers[pooling].append(layer)
        self.device = resolve_device(device)
        self.token_budget = token_budget
        self.loaded: dict[str, tuple[Any, Any]] = {}
        if check_weights:
            for use in uses.values():
                actual = folder_fingerprint(use.folder)["weights_sha256"] if use.folder.is_dir() else "<missing>"
                if actual != use.weights_sha256:
                    raise ModelSourceError(f"model {use.name!r} at {use.folder} has weights sha256 {actual[:16]}…, "
                                           f"the head was trained on {use.weights_sha256[:16]}…; refusing to predict")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_project(cls, store_root: Path, dataset: str, row: str | None = None, head: str | None = None,
                     seed: int | str = "best", embeddings_root: Path | str | None = None, **kwargs) -> "Predictor":
        """The head chosen among store_root/compare/<dataset>/results.json (row, head and seed: given, or chosen on
        validation), its models under store_root/models, its stores under embeddings_root (paths.embeddings;
        store_root/embeddings when None)."""
        head_dir = choose_head(store_root, dataset, row, head, seed)
        config = read_head_config(head_dir)
        embeddings_root = Path(store_root) / "embeddings" if embeddings_root is None else embeddings_root
        return cls(head_dir, uses_from_store(config, embeddings_root, dataset, Path(store_root) / "models"), **kwargs)

    @classmethod
    def from_export(cls, folder: Path, **kwargs) -> "Predictor":
        folder = Path(folder)
        manifest_path = folder / "export.json"
        if not manifest_path.is_file():
            raise PipelineError(f"{folder} is not an exported classifier (no export.json)")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        check_export_files(folder, manifest)
        uses = {name: ModelUse(name, folder / "models" / name, info["weights_sha256"], info["num_layers"],
                               info["max_len"], info["compute_dtype"], info["stored_dtype"],
                               attention=info.get("attention", TRANSFORMERS_DEFAULT),
                               position_ids_from=info.get("position_ids_from", 0))
                for name, info in manifest["models"].items()}
        return cls(folder / "head", uses, **kwargs)

    # -- compute ----------------------------------------------------------------------------------
    def model_for(self, use: ModelUse):
        """The loaded (model, tokenizer) of one input model, loaded once."""
        if use.name not in self.loaded:
            dtype = getattr(torch, use.compute_dtype)
            self.loaded[use.name] = load_model(use.folder, ModelSpec(name=use.name, source="local", path=str(use.folder)),
                                               str(self.device), dtype, use.attention)
            check_positions(self.loaded[use.name][0], use)
        return self.loaded[use.name]

    def settings_for(self, use: ModelUse, poolings) -> ExtractSettings:
        """Extraction settings that reproduce how the stored vectors were computed."""
        return ExtractSettings(max_len=use.max_len, token_budget=self.token_budget, block_rows=1, dtype="float32",
                               compute_dtype=use.compute_dtype, device=str(self.device), padding_side="right",
                               poolings=tuple(poolings), compressor={}, attention=use.attention)

    def _model_features(self, use: ModelUse, texts: list[str]) -> tuple[dict[tuple[str, int], np.ndarray], np.ndarray]:
        model, tokenizer = self.model_for(use)
        return model_features(model, tokenizer, use, texts, self.device, self.token_budget)

    def features(self, texts: list[str]) -> tuple[torch.Tensor, np.ndarray]:
        """Standardised, concatenated head inputs [N, sum(dims)] and a truncation flag per text."""
        columns, truncated = [], np.zeros(len(texts), dtype=bool)
        per_model = {}
        for name, use in self.uses.items():
            per_model[name], flags = self._model_features(use, texts)
            truncated |= flags
        for model, pooling, layer in self.inputs:
            columns.append(torch.from_numpy(per_model[model][(pooling, layer)]))
        x = torch.cat(columns, dim=1)
        return (x - self.mean) / self.std, truncated

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        x, truncated = self.features(texts)
        return torch.softmax(self.net(x), dim=-1).numpy(), truncated

    def describe(self) -> str:
        parts = []
        for use in self.uses.values():
            layers = sorted({l for ls in use.layers.values() for l in ls})
            parts.append(f"{use.name}: layers {layers} of 0..{use.num_layers - 1}, poolings {sorted(use.layers)}, "
                         f"{use.deepest} of {use.num_layers - 1} blocks run ({use.blocks_skipped:.0%} skipped)")
        return "; ".join(parts)

    def predict(self, records: Iterable[dict[str, Any]], show_progress: bool = False) -> Iterator[dict[str, Any]]:
        """Records {id, text} (or {id, error}) in, JSON-ready results out, in input order, chunk by chunk."""
        bar = tqdm(unit="text", disable=not show_progress, file=sys.stderr, mininterval=1.0)
        chunk: list[dict[str, Any]] = []
        for record in records:
            chunk.append(record)
            if len(chunk) >= CHUNK_TEXTS:
                yield from self._predict_chunk(chunk, bar)
                chunk = []
        if chunk:
            yield from self._predict_chunk(chunk, bar)
        bar.close()

    def _predict_chunk(self, chunk: list[dict[str, Any]], bar) -> Iterator[dict[str, Any]]:
        good = [r for r in chunk if "error" not in r]
        probabilities, truncated = self.predict_proba([r["text"] for r in good]) if good else (None, None)
        position = {id(r): i for i, r in enumerate(good)}
        for record in chunk:
            if "error" in record:
                yield {"id": record["id"], "error": record["error"]}
                continue
            row = position[id(record)]
            p = probabilities[row]
            yield {"id": record["id"], "label": self.label_names[int(p.argmax())],
                   "probabilities": {name: round(float(v), 6) for name, v in zip(self.label_names, p)},
                   "truncated": bool(truncated[row])}
        bar.update(len(chunk))


def model_features(model, tokenizer, use: ModelUse, texts: list[str], device, token_budget: int
                   ) -> tuple[dict[tuple[str, int], np.ndarray], np.ndarray]:
    """The (pooling, layer) vectors `use.layers` asks for, each forward pass stopped after `use.deepest`,
    rounded to the store's dtype; and a truncation flag per text. Predict and stage cost share it."""
    counts, truncated = count_tokens(tokenizer, texts, use.max_len)
    spec = PoolingSpec(tuple(use.layers), use.max_len)
    dim = text_config(model.config).hidden_size
    out = {(p, l): np.empty((len(texts), dim), np.float32) for p, layers in use.layers.items() for l in layers}
    for rows in token_budget_batches(np.minimum(counts, use.max_len), token_budget):
        vectors, _ = pool_batch(model, tokenizer, [texts[r] for r in rows], spec, device, use.deepest + 1)
        for (pooling, layer), target in out.items():
            values = vectors[pooling][:, layer]
            if use.stored_dtype.get(pooling, "float16") == "float16":
                values = values.astype(np.float16)        # exactly what the store holds
            target[rows] = values
    return out, truncated


def choose_head(store_root: Path, dataset: str, row: str | None, head: str | None, seed: int | str) -> Path:
    """The head folder for (row, head, seed) among the compared heads of a dataset (stage compare's
    results.json); unspecified parts are chosen by validation accuracy only."""
    results_path = Path(store_root) / "compare" / dataset / "results.json"
    if not results_path.is_file():
        raise PipelineError(f"no trained heads at {results_path.parent}: run `dvc repro` (stages train and compare) first")
    results, heads_root = read_record(results_path, HeadResults).results, Path(store_root) / "heads" / dataset
    candidates = [r for r in results if (row is None or r.row == row) and (head is None or r.head == head)]
    if not candidates:
        known = sorted({(r.row, r.head) for r in results})
        raise PipelineError(f"no trained head for row={row!r} head={head!r}; trained: {known}")
    best = chosen_on_validation(candidates)
    folder = heads_root / best.folder
    seeds = {int(p.name.removeprefix("seed")): p for p in folder.glob("seed*") if (p / "config.json").is_file()}
    if seed == "best":
        return max(seeds.values(), key=lambda p: read_head_config(p)["validation"]["accuracy"])
    if int(seed) not in seeds:
        raise PipelineError(f"{folder} has no seed {seed}; it has {sorted(seeds)}")
    return seeds[int(seed)]


def read_records(texts: list[str] | None = None, path: str | None = None, text_field: str | None = None,
                 stream=None) -> Iterator[dict[str, Any]]:
    """Texts from arguments, a file of lines, JSONL (with `text_field`) or a stream; bad lines become
    {id, error} records instead of stopping the run. Ids: the JSONL `id` field, else the line number."""
    if texts:
        for number, text in enumerate(texts, start=1):
            yield _check(str(number), text)
        return
    handle = open(path, "rb") if path and path != "-" else (stream or sys.stdin.buffer)
    try:
        for number, raw in enumerate(handle, start=1):
            line_id = str(number)
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                yield {"id": line_id, "error": f"invalid UTF-8 at byte {error.start}"}
                continue
            if text_field:
                try:
                    row = json.loads(line)
                    text = row[text_field]
                    line_id = str(row.get("id", line_id))
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    yield {"id": line_id, "error": f"not a JSON object with a {text_field!r} field ({error})"}
                    continue
            else:
                text = line
            yield _check(line_id, text)
    finally:
        if path and path != "-":
            handle.close()


def _check(record_id: str, text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        return {"id": record_id, "error": f"text is {type(text).__name__}, not a string"}
    if not text.strip():
        return {"id": record_id, "error": "empty or whitespace-only text"}
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:     # JSON's "\\ud800" decodes to a str no tokenizer can take
        return {"id": record_id, "error": f"text holds a lone surrogate (U+{ord(text[error.start]):04X}) at character "
                                          f"{error.start}, not valid Unicode"}
    return {"id": record_id, "text": text}
