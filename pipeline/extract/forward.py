"""One batch through a model: tokenise it, run the forward pass and pool every layer.

Stage 1's block loop and `predict` both pool through `pool_batch`; what the numbers depend on
besides the model and the device is a `PoolingSpec`. The compute-and-pool step is pluggable
(`Forward`): `eager_forward` (hooks + LayerPooler) by default, a compiled one
(pipeline/extract/compiled_forward.py) where `extract.forward` asks for it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from pipeline.config.sections import ExtractSettings
from pipeline.hidden_states.layer_tap import run_with_layers, text_config
from pipeline.hidden_states.pooling import LayerPooler

COUNT_CHUNK = 4096
# float32 states of the layers pooled together (eager_forward): on a CPU a group that stays in cache (a
# larger one is copied and read from memory: slower, measured), on a GPU most of a model's layers
POOL_GROUP_BYTES = {"cpu": 8 * 2**20, "cuda": 512 * 2**20}


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it natively (CUDA Ampere+, CPUs with AVX512-BF16/AMX)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else torch.float32


def native_bf16(device: torch.device) -> bool:
    """Whether the device runs bf16 natively (CUDA Ampere+; CPUs with AVX512-BF16 or AMX, as oneDNN sees them)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class Encoded:
    """A batch ready for the model."""
    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor        # real tokens
    content: torch.Tensor     # real, non-special tokens
    tokens: int               # real tokens in the batch


def count_tokens(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each text's token count before truncation (special tokens included) and its truncation flag."""
    counts = np.zeros(len(texts), dtype=np.int32)
    for start in range(0, len(texts), COUNT_CHUNK):
        chunk = texts[start:start + COUNT_CHUNK]
        lengths = [len(ids) for ids in tokenizer(chunk, truncation=True, max_length=max_len,
                                                 return_attention_mask=False)["input_ids"]]
        at_limit = [i for i, n in enumerate(lengths) if n >= max_len]
        if at_limit:   # only texts that hit the limit need their full length
            full = tokenizer([chunk[i] for i in at_limit], return_attention_mask=False)["input_ids"]
            for i, ids in zip(at_limit, full):
                lengths[i] = len(ids)
        counts[start:start + len(chunk)] = lengths
    return counts, counts > max_len


@dataclass(frozen=True)
class PositionRule:
    """How a model numbers the positions of a text fed alone, so that a padded batch gives every text
    exactly those positions (issue 21: RoBERTa, XLM-R and MPNet number from padding_idx + 1, not 0).

    first: the position id of a text's first token; takes_ids: whether the model's forward accepts
    `position_ids` at all (Bloom's ALiBi, for one, derives everything from the attention mask).
    """
    first: int = 0
    takes_ids: bool = True

    def padding_side(self, wanted: str) -> str:
        """Right padding needs no position ids: every model numbers a right-padded text's real tokens as it
        numbers the text alone. Left padding needs them; a model that takes none is padded on the right
        (pooled vectors do not depend on the side, so this changes nothing stored)."""
        return wanted if self.takes_ids else "right"


def position_rule(model) -> PositionRule:
    """Read the rule off the model itself, not a list of family names: a learned position table that
    reserves a padding row (nn.Embedding with padding_idx, the fairseq convention of RoBERTa, XLM-R,
    MPNet, CamemBERT, ...) numbers real tokens from padding_idx + 1; every other model from 0 (models
    with their own offset, like OPT's, add it inside forward)."""
    import inspect
    first = 0
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] == "position_embeddings"
                and module.padding_idx is not None):
            first = module.padding_idx + 1
            break
    return PositionRule(first, "position_ids" in inspect.signature(model.forward).parameters)


def model_skeleton(config, trust_remote_code: bool = False):
    """A weightless (meta-device) instance of the model a config builds: what the store's fingerprint
    and the family checks need to know before any weights are loaded or any store is created."""
    from transformers import AutoModel
    with torch.device("meta"):
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def encode(tokenizer, texts: list[str], max_len: int, padding_side: str, device: torch.device,
           positions: PositionRule) -> Encoded:
    """Tokenise and pad by hand. Right padding passes no position ids, so the model numbers every text as
    it does alone; left padding passes the ids `positions` says the model would give each text alone."""
    padding_side = positions.padding_side(padding_side)
    encoded = tokenizer(texts, truncation=True, max_length=max_len, return_special_tokens_mask=True,
                        return_attention_mask=False)
    ids, specials = encoded["input_ids"], encoded["special_tokens_mask"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    width, total = int(lengths.max()), int(lengths.sum())
    columns = np.arange(width)
    # real tokens are contiguous in each row, so the row-major order of `real` is the tokens' own order
    real = columns < lengths[:, None] if padding_side == "right" else columns >= width - lengths[:, None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    input_ids[real] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
    special = np.zeros((len(ids), width), dtype=bool)
    special[real] = np.fromiter(itertools.chain.from_iterable(specials), dtype=bool, count=total)
    input_ids, mask, special = torch.from_numpy(input_ids), torch.from_numpy(real), torch.from_numpy(special)
    inputs = {"input_ids": input_ids, "attention_mask": mask.long()}
    if padding_side == "left":       # pads get the padding row (RoBERTa-style) or 0; attention never reads them
        counted = positions.first + mask.long().cumsum(dim=1) - 1
        inputs["position_ids"] = torch.where(mask, counted, max(positions.first - 1, 0))
    tokens = int(mask.sum())
    content = mask & ~special
    if device.type == "cuda":   # pinned host memory: the copies below run asynchronously
        inputs = {k: v.pin_memory() for k, v in inputs.items()}
        mask, content = mask.pin_memory(), content.pin_memory()
    return Encoded({k: v.to(device, non_blocking=True) for k, v in inputs.items()}, mask.to(device, non_blocking=True),
                   content.to(device, non_blocking=True), tokens)


@dataclass(frozen=True)
class PoolingSpec:
    """What a batch's pooled vectors depend on besides the model and the device (not how rows are
    grouped into blocks, stored or compressed): Stage 1 and predict both pool through it."""
    poolings: tuple[str, ...]
    max_len: int
    padding_side: str = "right"

    @classmethod
    def of(cls, settings: ExtractSettings) -> "PoolingSpec":
        return cls(tuple(settings.poolings), settings.max_len, settings.padding_side)


class Forward(Protocol):
    """The compute-and-pool step, pluggable: pool layers 0..num_layers-1 of one encoded batch.

    Returns [len(poolings), B, num_layers, D] float32 on the batch's device, the same numbers as
    pooling.POOLINGS applied to each layer's states (layer 0 = embedding output, i = block i's output).
    `eager_forward` is the default; a compiled forward that pools inside its graph plugs in here.
    """

    def __call__(self, model, batch: Encoded, poolings: Sequence[str], num_layers: int) -> torch.Tensor: ...


def eager_forward(model, batch: Encoded, poolings: Sequence[str], num_layers: int) -> torch.Tensor:
    """Hooks hand each layer's states over as the forward pass produces them; LayerPooler pools them a
    group at a time (as many layers as POOL_GROUP_BYTES of float32 holds), so the ops per batch grow
    with depth only by group. No host syncs; blocks past the deepest wanted layer are
    skipped."""
    poolings = list(poolings)
    total = text_config(model.config).num_hidden_layers + 1
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must lie in 1..{total}, got {num_layers}")
    dim = text_config(model.config).hidden_size
    out = torch.empty((len(poolings), batch.mask.shape[0], num_layers, dim), dtype=torch.float32,
                      device=batch.mask.device)
    with torch.inference_mode():
        pooler = LayerPooler(batch.mask, batch.content, poolings)
        budget = POOL_GROUP_BYTES.get(batch.mask.device.type, POOL_GROUP_BYTES["cpu"])
        group = max(1, budget // (batch.mask.numel() * dim * 4))
        pending: list[torch.Tensor] = []

        def on_layer(index: int, hidden: torch.Tensor) -> None:
            pending.append(hidden)
            if len(pending) == group or index == num_layers - 1:
                out[:, :, index + 1 - len(pending):index + 1] = pooler.pool_layers(pending)
                pending.clear()

        run_with_layers(model, batch.inputs, on_layer, stop_after=None if num_layers == total else num_layers - 1)
    return out


def to_host(values: torch.Tensor) -> np.ndarray:
    """One copy to the host (pinned and asynchronous on a GPU, then one sync)."""
    if values.device.type == "cuda":
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        torch.cuda.current_stream(values.device).synchronize()
        values = host
    return values.numpy() if values.device.type == "cpu" else values.cpu().numpy()


def pool_batch(model, tokenizer, texts: list[str], spec: PoolingSpec, device: torch.device, num_layers: int,
               batch: Encoded | None = None, forward: Forward = eager_forward) -> tuple[dict[str, np.ndarray], int]:
    """Pooled vectors [B, num_layers, D] float32 per pooling for one batch, and its real token count.

    `num_layers`: layers 0..num_layers-1 are pooled (predict stops at the deepest layer its head reads).
    `batch`: the texts already encoded (the block loop tokenises the next batch while this one runs).
    """
    if batch is None:
        batch = encode(tokenizer, texts, spec.max_len, spec.padding_side, device, position_rule(model))
    values = to_host(forward(model, batch, spec.poolings, num_layers))
    return {name: values[i] for i, name in enumerate(spec.poolings)}, batch.tokens
