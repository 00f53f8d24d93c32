"""The LightningDataModule: the needed layer slices, read from the store once, held as tensors.

Inputs are (model, pooling, layer) triples; each is standardised with its train-split mean and std
(decoder layers differ in scale by orders of magnitude). The cache holds ONE float32 tensor per
(model, pooling, split), [N, layers read, D], in which every layer is standardised in place: a run
never copies it. A batch is gathered straight from those tensors (the rows and layers it needs,
concatenated per row), so memory is the layers read plus one batch, and an epoch costs what a plain
torch loop over one feature tensor costs. The test split is read only when first asked for (after
training), once for all heads.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from pipeline.select.probe import standardise_stats
from pipeline.store.reader import EmbeddingStore, open_store

Input = tuple[str, str, int]     # (model, pooling, layer)


class LayerCache:
    """Standardised layer slices of one dataset, read once per stage and shared by every head."""

    def __init__(self, embeddings_root, dataset: str, splits: Iterable[str] = ("train", "validation", "test")):
        self.embeddings_root, self.dataset, self.splits = embeddings_root, dataset, tuple(splits)
        self.stores: dict[str, EmbeddingStore] = {}
        # (model, pooling) -> split -> [N, len(layers), D]; layers in `self.layers[(model, pooling)]` order
        self.tensors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.layers: dict[tuple[str, str], list[int]] = {}
        self.stats: dict[Input, tuple[np.ndarray, np.ndarray]] = {}
        self.bytes_read = 0

    def store(self, model: str) -> EmbeddingStore:
        if model not in self.stores:
            self.stores[model] = open_store(self.embeddings_root, model, self.dataset)
        return self.stores[model]

    def load(self, inputs: Iterable[Input], splits: Iterable[str] = ("train", "validation")) -> None:
        """Make sure these inputs are held for these splits; each layer of each split is read once.

        Declaring every input of a stage up front (`train_dataset` does) gives one tensor per
        (model, pooling, split) with no reallocation.
        """
        wanted: dict[tuple[str, str], list[int]] = {}
        for model, pooling, layer in inputs:
            layers = wanted.setdefault((model, pooling), [])
            if int(layer) not in layers:
                layers.append(int(layer))
        for key, layers in wanted.items():
            held = self.layers.get(key, [])
            missing = [layer for layer in sorted(layers) if layer not in held]
            if missing:
                self._add_layers(key, held + missing)
            for split in splits:
                if split not in self.tensors[key]:
                    self._read_split(key, split)
        for store in self.stores.values():
            store.release()             # blocks decoded for verification served this load; free them

    def _add_layers(self, key: tuple[str, str], layers: list[int]) -> None:
        """Grow (model, pooling) to `layers` for every split held so far; old layers are moved, not re-read."""
        old, old_layers = self.tensors.get(key, {}), self.layers.get(key, [])
        self.layers[key] = layers
        self.tensors[key] = {}
        for split, tensor in old.items():
            grown = torch.empty((tensor.shape[0], len(layers), tensor.shape[2]), dtype=torch.float32)
            grown[:, :len(old_layers)] = tensor
            del tensor
            old[split] = None
            self.tensors[key][split] = grown
            for j in range(len(old_layers), len(layers)):
                self._read_layer(key, split, j)

    def _read_split(self, key: tuple[str, str], split: str) -> None:
        store = self.store(key[0])
        if split != "train":
            for layer in self.layers[key]:                 # statistics come from train only
                if (*key, layer) not in self.stats:
                    self._read_split(key, "train")
                    break
        self.tensors[key][split] = torch.empty((store.num_rows(split), len(self.layers[key]), store.dim),
                                               dtype=torch.float32)
        for j in range(len(self.layers[key])):
            self._read_layer(key, split, j)

    def _read_layer(self, key: tuple[str, str], split: str, j: int) -> None:
        model, pooling = key
        layer = self.layers[key][j]
        raw = self.store(model).layer(split, pooling, layer)
        self.bytes_read += raw.nbytes
        if split == "train" and (model, pooling, layer) not in self.stats:
            self.stats[(model, pooling, layer)] = standardise_stats(raw)
        mean, std = self.stats[(model, pooling, layer)]
        target = self.tensors[key][split][:, j]
        target.copy_(torch.from_numpy(raw))
        target.sub_(torch.from_numpy(mean)).div_(torch.from_numpy(std))

    def block(self, model: str, pooling: str, split: str) -> tuple[torch.Tensor, list[int]]:
        """The held tensor [N, layers, D] of (model, pooling, split) and its layer order."""
        return self.tensors[(model, pooling)][split], self.layers[(model, pooling)]

    def get(self, item: Input) -> dict[str, torch.Tensor]:
        """One input's standardised rows per held split (views into the cache)."""
        item = (item[0], item[1], int(item[2]))
        self.load([item], [s for s in self.splits if s != "test"])
        tensors, layers = self.tensors[item[:2]], self.layers[item[:2]]
        j = layers.index(item[2])
        return {split: t[:, j] for split, t in tensors.items()}

    def labels(self, model: str, split: str) -> torch.Tensor:
        return torch.as_tensor(self.store(model).labels(split), dtype=torch.long)


class FusedRows(Dataset):
    """Rows of several inputs concatenated, gathered per batch from the cache's tensors (no full copy).

    `parts` are (tensor [N, layers, D], positions of the wanted layers) in input order.
    """

    def __init__(self, parts: list[tuple[torch.Tensor, list[int]]], y: torch.Tensor):
        self.y = y
        self.parts = []
        for tensor, positions in parts:
            if positions == list(range(tensor.shape[1])):
                view = tensor                                             # all held layers: no selection
            elif positions == list(range(positions[0], positions[-1] + 1)):
                view = tensor[:, positions[0]:positions[-1] + 1]           # a contiguous range: a view
            else:
                view = (tensor, torch.tensor(positions))
            self.parts.append(view)

    def __len__(self) -> int:
        return len(self.y)

    def _gather(self, part, rows: torch.Tensor) -> torch.Tensor:
        if isinstance(part, tuple):
            tensor, positions = part
            out = tensor[rows[:, None], positions[None, :]]
        else:
            out = part.index_select(0, rows)
        return out.reshape(len(rows), -1)

    def __getitem__(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(rows)
        pieces = [self._gather(part, rows) for part in self.parts]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)), self.y[rows]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row in order, `batch_size` at a time."""
        for start in range(0, len(self), batch_size):
            yield self[torch.arange(start, min(start + batch_size, len(self)))]


class LayerDataModule(L.LightningDataModule):
    """Train / validation / test batches for one list of inputs, gathered from the shared cache.

    Train batches hold at most `batch_size` rows and shrink so that an epoch takes at least
    `min_steps_per_epoch` optimiser steps: with one step per epoch (1,000 train rows, batch 1024),
    early stopping judged the first few Adam steps alone and kept near-chance heads.
    """

    def __init__(self, cache: LayerCache, inputs: list[Input], batch_size: int = 512, seed: int = 0,
                 min_steps_per_epoch: int = 1):
        super().__init__()
        self.cache, self.inputs, self.batch_size, self.seed = cache, [tuple(i) for i in inputs], batch_size, seed
        self.min_steps_per_epoch = min_steps_per_epoch
        self.data: dict[str, FusedRows] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in self.cache.splits:
            if split != "test":
                self.rows(split)

    def rows(self, split: str) -> FusedRows:
        """The split's rows of these inputs (test: read on first use, after training)."""
        if split not in self.data:
            self.cache.load(self.inputs, [split])
            label_model = self.inputs[0][0]
            y = self.cache.labels(label_model, split)
            for model in {i[0] for i in self.inputs}:      # several models: their rows must be the same texts
                if model != label_model and not torch.equal(self.cache.labels(model, split), y):
                    raise ValueError(f"{model} and {label_model} disagree on the rows of {split}")
            parts: list[tuple[torch.Tensor, list[int]]] = []
            for model, pooling, layer in self.inputs:        # consecutive inputs of one (model, pooling): one gather
                tensor, layers = self.cache.block(model, pooling, split)
                if parts and parts[-1][0] is tensor:
                    parts[-1][1].append(layers.index(layer))
                else:
                    parts.append((tensor, [layers.index(layer)]))
            self.data[split] = FusedRows(parts, y)
        return self.data[split]

    @property
    def input_dims(self) -> list[int]:
        return [self.cache.store(m).dim for m, _, _ in self.inputs]

    def standardisation(self) -> dict[str, torch.Tensor]:
        means = [torch.from_numpy(self.cache.stats[(m, p, int(l))][0]) for m, p, l in self.inputs]
        stds = [torch.from_numpy(self.cache.stats[(m, p, int(l))][1]) for m, p, l in self.inputs]
        return {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}

    @property
    def train_batch_size(self) -> int:
        """`batch_size`, or fewer rows where that gives an epoch fewer than `min_steps_per_epoch` steps."""
        return max(1, min(self.batch_size, math.ceil(len(self.rows("train")) / self.min_steps_per_epoch)))

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        data = self.rows(split)
        generator = torch.Generator().manual_seed(self.seed)
        sampler = RandomSampler(data, generator=generator) if shuffle else SequentialSampler(data)
        return DataLoader(data, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.train_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, self.batch_size)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every row of a split in order, for `trainer.predict` (test: read here, after training)."""
        return self._loader(split, False, self.batch_size)
