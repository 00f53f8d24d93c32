"""One batch through a model: tokenise it, run the forward pass and pool every layer.

Stage 1's block loop and `predict` both pool through `pool_batch`; what the numbers depend on
besides the model and the device is a `PoolingSpec`. The compute-and-pool step is pluggable
(`Forward`): `eager_forward` (hooks + LayerPooler) by default, a compiled one
(pipeline/compiled_forward.py) where `extract.forward` asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from pipeline.config import ExtractSettings
from pipeline.layer_tap import find_blocks, run_with_layers, text_config
from pipeline.pooling import LayerPooler

COUNT_CHUNK = 4096


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


def encode(tokenizer, texts: list[str], max_len: int, padding_side: str, device: torch.device) -> Encoded:
    """Tokenise and pad by hand; position ids follow the real tokens, so left padding changes nothing."""
    encoded = tokenizer(texts, truncation=True, max_length=max_len, return_special_tokens_mask=True,
                        return_attention_mask=False)
    ids, specials = encoded["input_ids"], encoded["special_tokens_mask"]
    width = max(len(row) for row in ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    special = torch.zeros((len(ids), width), dtype=torch.bool)
    for row, (tokens, flags) in enumerate(zip(ids, specials)):
        span = slice(0, len(tokens)) if padding_side == "right" else slice(width - len(tokens), width)
        input_ids[row, span] = torch.tensor(tokens)
        mask[row, span] = True
        special[row, span] = torch.tensor(flags, dtype=torch.bool)
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "attention_mask": mask.long(), "position_ids": positions}
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
    """Hooks hand each layer's states to LayerPooler as the forward pass produces them (one float32
    copy per layer, no host syncs); blocks past the deepest wanted layer are skipped."""
    poolings = list(poolings)
    total = len(find_blocks(model)) + 1
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must lie in 1..{total}, got {num_layers}")
    dim = text_config(model.config).hidden_size
    out = torch.empty((len(poolings), batch.mask.shape[0], num_layers, dim), dtype=torch.float32,
                      device=batch.mask.device)
    with torch.inference_mode():
        pooler = LayerPooler(batch.mask, batch.content, poolings)

        def on_layer(index: int, hidden: torch.Tensor) -> None:
            pooler(hidden, {name: out[i, :, index] for i, name in enumerate(poolings)})

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
        batch = encode(tokenizer, texts, spec.max_len, spec.padding_side, device)
    values = to_host(forward(model, batch, spec.poolings, num_layers))
    return {name: values[i] for i, name in enumerate(spec.poolings)}, batch.tokens
