"""Classification heads over fused layer vectors, as plain nn.Modules wrapped by one LightningModule.

Every head reads one tensor x [B, sum(input_dims)]: the per-layer standardised input vectors
(config `inputs`, a list of (model, pooling, layer)) concatenated in order. The head does the
fusion itself, so a saved head (model.safetensors + config.json + standardisation.safetensors) is
everything `predict`/`export` need. Heads return logits; CrossEntropyLoss applies the only softmax.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import nn
from torchmetrics import MeanMetric

from pipeline.config.sections import HEAD_NAMES, head_options
from pipeline.core.errors import HeadError

HEADS = HEAD_NAMES                # one list, in pipeline.config (load_params checks train.heads against it)


def split_inputs(x: torch.Tensor, dims: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, dims, dim=-1))


class Fuse(nn.Module):
    """Applies the fusion groups: each group fuses some inputs (mean | max | concat); groups are concatenated."""

    def __init__(self, input_dims: list[int], groups: list[dict[str, Any]]):
        super().__init__()
        self.input_dims, self.groups = list(input_dims), [dict(g) for g in groups]
        widths = []
        for group in self.groups:
            dims = [self.input_dims[i] for i in group["inputs"]]
            if group["operator"] in ("mean", "max") and len(set(dims)) > 1:
                raise ValueError(f"{group['operator']} needs inputs of one width, got {dims}")
            widths.append(sum(dims) if group["operator"] == "concat" else dims[0])
        self.width = sum(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = split_inputs(x, self.input_dims)
        out = []
        for group in self.groups:
            chosen = [parts[i] for i in group["inputs"]]
            if group["operator"] == "concat" or len(chosen) == 1:
                out.append(torch.cat(chosen, dim=-1))
            elif group["operator"] == "mean":
                out.append(torch.stack(chosen, 0).mean(0))
            else:
                out.append(torch.stack(chosen, 0).amax(0))
        return torch.cat(out, dim=-1)


def mlp(width: int, widths: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for hidden in widths:
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class FusedHead(nn.Module):
    """Linear (widths = []) or MLP head on the fused vector."""

    def __init__(self, input_dims: list[int], groups: list[dict[str, Any]], num_classes: int,
                 widths: list[int] = (), dropout: float = 0.0):
        super().__init__()
        self.fuse = Fuse(input_dims, groups)
        self.net = mlp(self.fuse.width, list(widths), num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.fuse(x))


class CooccurrenceHead(nn.Module):
    """LLMEmbed's co-occurrence head, with the double softmax of the released code removed.

    Each input vector is projected to `width`; P is the Gram matrix of the projected vectors
    (scaled by 1/sqrt(width) so that sigma means the same at any width), squashed to
    2*sigmoid(sigma*P) - 1; its upper triangle is concatenated with the mean of the projected
    decoder inputs (all inputs when none is a decoder) and fed to an MLP that returns logits.
    """

    def __init__(self, input_dims: list[int], decoder: list[bool], num_classes: int, width: int = 256,
                 sigma: float = 1.0, widths: list[int] = (256,), dropout: float = 0.5):
        super().__init__()
        self.input_dims, self.width, self.sigma = list(input_dims), width, float(sigma)
        self.project = nn.ModuleList(nn.Linear(d, width) for d in input_dims)
        mask = torch.tensor(decoder if any(decoder) else [True] * len(input_dims), dtype=torch.float32)
        self.register_buffer("decoder_weights", mask / mask.sum(), persistent=False)
        n = len(input_dims)
        rows, cols = torch.triu_indices(n, n)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.head = mlp(len(rows) + width, list(widths), num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        V = torch.stack([p(part) for p, part in zip(self.project, split_inputs(x, self.input_dims))], 1)
        P = V @ V.transpose(1, 2) / self.width ** 0.5                       # [B, n, n]
        co = 2 * torch.sigmoid(self.sigma * P[:, self.rows, self.cols]) - 1
        decoder_mean = (V * self.decoder_weights[None, :, None]).sum(1)
        return self.head(torch.cat([co, decoder_mean], dim=-1))


class ScalarMixHead(nn.Module):
    """ELMo-style learned layer mix: gamma * sum_l softmax(s)_l x_l over all layers of one model, then
    a linear (or MLP) classifier. The learned weights say which layers the task uses."""

    def __init__(self, input_dims: list[int], num_classes: int, widths: list[int] = (), dropout: float = 0.1):
        super().__init__()
        if len(set(input_dims)) != 1:
            raise ValueError("scalar_mix mixes layers of one model: all inputs must have one width")
        self.num_inputs, self.dim = len(input_dims), input_dims[0]
        self.logits = nn.Parameter(torch.zeros(self.num_inputs))
        self.gamma = nn.Parameter(torch.ones(()))
        self.dropout = nn.Dropout(dropout)
        self.net = mlp(self.dim, list(widths), num_classes, 0.0)

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.gamma * (self.weights() @ x.view(x.shape[0], self.num_inputs, self.dim))     # [B, D]
        return self.net(self.dropout(mixed))


class GatedHead(nn.Module):
    """Input-dependent softmax gate over the fused sources (each (model, pooling, layer) input).

    Each source is projected to `width` by its own linear map; a linear gate on the concatenated
    standardised inputs gives one softmax weight per source and text; the weighted sum of the
    projections goes through dropout and a linear (widths = []) or MLP classifier. Where the scalar
    mix learns one global weighting of one model's layers, this head weighs sources per text, across
    models of different widths. The gate starts uniform (zero weights).
    """

    def __init__(self, input_dims: list[int], num_classes: int, width: int = 256, widths: list[int] = (),
                 dropout: float = 0.1):
        super().__init__()
        self.input_dims = list(input_dims)
        self.project = nn.ModuleList(nn.Linear(d, width) for d in input_dims)
        self.gate = nn.Linear(sum(input_dims), len(input_dims))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.dropout = nn.Dropout(dropout)
        self.net = mlp(width, list(widths), num_classes, dropout)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-text weights of the sources, [B, sources], each row summing to 1."""
        return torch.softmax(self.gate(x), dim=-1)

    def forward_with_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the gate weights they were mixed with (one gate pass serves both)."""
        V = torch.stack([p(part) for p, part in zip(self.project, split_inputs(x, self.input_dims))], 1)
        gates = self.gates(x)
        mixed = (gates.unsqueeze(-1) * V).sum(1)                                    # [B, width]
        return self.net(self.dropout(mixed)), gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_gates(x)[0]


def build_net(config: dict[str, Any]) -> nn.Module:
    """The nn.Module a config.json describes (used both to train and to load)."""
    head, dims, classes = config["head"], config["input_dims"], len(config["label_names"])
    options = {**head_options(head), **config.get("options", {})}   # params.yaml's defaults, defined in config
    if head == "linear":
        return FusedHead(dims, config["groups"], classes)
    if head == "mlp":
        return FusedHead(dims, config["groups"], classes, options["widths"], options["dropout"])
    if head == "cooccurrence":
        return CooccurrenceHead(dims, config["decoder"], classes, options["width"], options["sigma"],
                                options["widths"], options["dropout"])
    if head == "scalar_mix":
        return ScalarMixHead(dims, classes, options["widths"], options["dropout"])
    if head == "gated":
        return GatedHead(dims, classes, options["width"], options["widths"], options["dropout"])
    raise ValueError(f"unknown head {head!r}; known heads are {list(HEADS)}")


class HeadModule(L.LightningModule):
    """Trains any head with cross-entropy on logits and AdamW. Lightning keeps the epoch means
    (`self.log(..., on_epoch=True)`, weighted by batch size); the train loss is summed by a torchmetrics
    MeanMetric and logged once per epoch (a `self.log` per training step cost a linear head ~20% of
    its epoch); `predict_step` returns what evaluation needs (logits, labels and, for a gated head, its
    gate weights), read back by `trainer.predict`."""

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.net, self.lr, self.weight_decay = net, lr, weight_decay
        self.loss = nn.CrossEntropyLoss()
        self.train_loss = MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = self.loss(self.net(x), y)
        self.train_loss.update(loss.detach(), len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train_loss", self.train_loss)         # computed and reset by Lightning at the epoch's end

    def validation_step(self, batch, _):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", self.loss(logits, y), on_step=False, on_epoch=True, batch_size=len(y))
        self.log("val_accuracy", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True,
                 batch_size=len(y))

    def predict_step(self, batch, _, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x, y = batch
        if isinstance(self.net, GatedHead):
            logits, gates = self.net.forward_with_gates(x)
            return {"logits": logits.cpu(), "labels": y.cpu(), "gates": gates.cpu()}
        return {"logits": self.net(x).cpu(), "labels": y.cpu()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)


UNREADABLE = (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
"""What a missing, truncated or foreign head file raises while it is read (json's and safetensors'
parse errors, torch's state-dict mismatch)."""


def _damaged(path: Path, error: Exception) -> HeadError:
    return HeadError(f"head file {path} is missing or damaged ({type(error).__name__}: {error}); "
                     f"retrain the head (dvc repro, stage train) or export it again")


def verified_bytes(path: Path, expected: str | None, record: Path, what: str = "head file") -> bytes:
    """A file's bytes when their sha256 is the one `record` holds; else a HeadError naming the file. One flipped
    bit in the standardisation once turned a confident positive into a confident negative, silently."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _damaged(path, error) from error
    if expected is None:
        raise HeadError(f"{what} {path}: {record} records no sha256 for it (a head from before heads were "
                        f"verified); retrain the head (dvc repro, stage train) or export it again")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise HeadError(f"{what} {path} is missing or damaged: sha256 {actual[:16]}… differs from the "
                        f"{expected[:16]}… recorded in {record}; retrain the head (dvc repro, stage train) or "
                        f"export it again")
    return data


def _head_file(folder: Path, name: str, config: dict[str, Any]) -> bytes:
    return verified_bytes(folder / name, config.get("files_sha256", {}).get(name), folder / "config.json")


def read_head_config(folder: str | Path) -> dict[str, Any]:
    """A head's config.json, or a HeadError naming the file."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UNREADABLE as error:
        raise _damaged(path, error) from error
    if not isinstance(config, dict):
        raise _damaged(path, TypeError(f"holds a JSON {type(config).__name__}, not an object"))
    return config


def load_head(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained head in eval mode and its config; inputs must be standardised with the saved stats
    (see `load_standardisation`) and concatenated in `config['inputs']` order."""
    folder = Path(folder)
    config = read_head_config(folder)
    try:
        net = build_net(config)
    except UNREADABLE as error:
        raise _damaged(folder / "config.json", error) from error
    try:
        net.load_state_dict(load(_head_file(folder, "model.safetensors", config)))
    except UNREADABLE as error:
        raise _damaged(folder / "model.safetensors", error) from error
    return net.eval(), config


def load_standardisation(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-split mean and std per input dimension ([sum(input_dims)] each), as saved with the head."""
    config = read_head_config(folder)
    name = config.get("standardisation", "standardisation.safetensors")
    path = Path(folder) / name
    try:
        stats = load(_head_file(Path(folder), name, config))
        return stats["mean"], stats["std"]
    except UNREADABLE as error:
        raise _damaged(path, error) from error
