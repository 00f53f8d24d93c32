"""Stage 1: stream a corpus through a frozen model once, pooling every layer into the store.

Work goes block by block (block = `block_rows` rows in corpus order = one Zarr shard). Inside a
block, texts are sorted by length and batched under a token budget; each layer is pooled as the
forward pass produces it; the block is written, then marked done. A rerun skips done blocks, and
since a block's batches depend only on its own rows, a resumed store is bit-identical.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.batching import token_budget_batches
from pipeline.config import ExtractSettings, Params
from pipeline.corpora import Corpus, read_corpus
from pipeline.fingerprint import package_versions
from pipeline.layer_tap import run_with_layers, text_config
from pipeline.models import is_decoder, load_model, read_source
from pipeline.pooling import pool
from pipeline.store import Float16Overflow, SplitRows, StoreWriter

COUNT_CHUNK = 4096


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"extract.device is {name!r} but no CUDA device is visible")
    return torch.device(name)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it natively (CUDA Ampere+, CPUs with AVX512-BF16/AMX)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float32


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
    return Encoded({k: v.to(device, non_blocking=True) for k, v in inputs.items()}, mask.to(device),
                   (mask & ~special).to(device), int(mask.sum()))


def pool_batch(model, tokenizer, texts: list[str], settings: ExtractSettings, device: torch.device,
               num_layers: int, stop_after: int | None = None, poolings=None) -> tuple[dict[str, np.ndarray], int]:
    """Pooled vectors [B, layers, D] float32 per pooling for one batch, and its real token count."""
    poolings = list(poolings or settings.poolings)
    batch = encode(tokenizer, texts, settings.max_len, settings.padding_side, device)
    layers = num_layers if stop_after is None else stop_after + 1
    dim = text_config(model.config).hidden_size
    out = {p: torch.empty((len(texts), layers, dim), dtype=torch.float32, device=device) for p in poolings}

    def on_layer(index: int, hidden: torch.Tensor) -> None:
        for name, vectors in pool(hidden, batch.mask, batch.content, poolings).items():
            out[name][:, index] = vectors

    with torch.inference_mode():
        run_with_layers(model, batch.inputs, on_layer, stop_after=stop_after)
    return {name: tensor.cpu().numpy() for name, tensor in out.items()}, batch.tokens


def fingerprint_for(params: Params, model_name: str, corpus: Corpus, source: dict[str, Any],
                    compute_dtype: torch.dtype) -> dict[str, Any]:
    """What the stored numbers depend on; a store whose fingerprint differs is refused."""
    settings = params.extract
    return {
        "model": {"name": model_name, "source": params.model(model_name).source,
                  "weights_sha256": source["weights_sha256"], "tokenizer_sha256": source["tokenizer_sha256"]},
        "extract": {"max_len": settings.max_len, "dtype": settings.dtype, "poolings": list(settings.poolings),
                    "block_rows": settings.block_rows, "compute_dtype": str(compute_dtype).removeprefix("torch.")},
        "dataset": {"name": corpus.name, "sha256": corpus.meta["sha256"], "label_names": corpus.label_names,
                    "carve": corpus.meta["carve"]},
    }


def _split_rows(corpus: Corpus, split: str, counts: np.ndarray, truncated: np.ndarray) -> SplitRows:
    data = corpus.splits[split]
    index = {name: i for i, name in enumerate(corpus.label_names)}
    return SplitRows(labels=np.array([index[label] for label in data.labels], dtype=np.int32),
                     text_id=np.array(data.ids, dtype=object), source_index=np.array(data.source_index, np.int64),
                     token_count=counts, truncated=truncated)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extract(params: Params, model_name: str, dataset_name: str, rebuild: bool = False,
            show_progress: bool = True) -> dict[str, Any]:
    """Extract every split of one model x dataset into its store; returns the run's summary."""
    from transformers import AutoConfig, AutoTokenizer

    settings = params.extract
    spec = params.model(model_name)
    model_dir = params.model_dir(model_name)
    source = read_source(model_dir)
    corpus = read_corpus(params.data_dir(dataset_name))
    device = resolve_device(settings.device)
    compute_dtype = resolve_compute_dtype(settings.compute_dtype, device)
    config = text_config(AutoConfig.from_pretrained(model_dir, trust_remote_code=spec.trust_remote_code))
    num_layers, dim = config.num_hidden_layers + 1, config.hidden_size
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.trust_remote_code)

    info = {"versions": package_versions(), "model_dir": str(model_dir), "model_origin": source.get("origin"),
            "decoder": is_decoder(config), "model_type": config.model_type, "dataset_source": corpus.meta["source"],
            "layer_convention": "0 = embedding output, i = output of block i, last = last_hidden_state"}
    writer = StoreWriter(params.embeddings_path(model_name, dataset_name),
                         fingerprint_for(params, model_name, corpus, source, compute_dtype), info,
                         num_layers=num_layers, dim=dim, poolings=settings.poolings,
                         block_rows=settings.block_rows, dtype=settings.dtype, compressor=settings.compressor,
                         rebuild=rebuild)
    dropped = corpus.meta["dropped"]
    for split in corpus.splits:
        if split not in writer.root.attrs.get("splits", {}):
            counts, truncated = count_tokens(tokenizer, corpus.splits[split].texts, settings.max_len)
            writer.init_split(split, _split_rows(corpus, split, counts, truncated),
                              [d for d in dropped if d["split"] == split])

    pending = {s: np.flatnonzero(~writer.done_blocks(s)).tolist() for s in corpus.splits}
    total_rows = sum(writer.block_range(s, b)[1] - writer.block_range(s, b)[0] for s in pending for b in pending[s])
    summary = {"model": model_name, "dataset": dataset_name, "texts": 0, "tokens": 0, "seconds": 0.0,
               "blocks": sum(map(len, pending.values())), "device": str(device),
               "compute_dtype": str(compute_dtype).removeprefix("torch."), "token_budget": settings.token_budget}
    if total_rows == 0:
        print(f"{model_name} x {dataset_name}: store complete, nothing to extract", file=sys.stderr)
        return summary

    started = time.perf_counter()
    model, _ = load_model(model_dir, spec, str(device), compute_dtype)
    load_seconds = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total_rows, unit="text", disable=not show_progress, dynamic_ncols=True,
               desc=f"{model_name} x {dataset_name}", mininterval=2.0, file=sys.stderr)
    started = time.perf_counter()
    split_queue = list(corpus.splits)
    while split_queue:
        split = split_queue.pop(0)
        texts = corpus.splits[split].texts
        counts = writer.root[split]["token_count"][:]
        for block in np.flatnonzero(~writer.done_blocks(split)):
            start, stop = writer.block_range(split, int(block))
            lengths = np.minimum(counts[start:stop], settings.max_len)
            buffers = {p: np.empty((stop - start, num_layers, dim), dtype=np.float32) for p in settings.poolings}
            for rows in token_budget_batches(lengths, settings.token_budget):
                vectors, tokens = pool_batch(model, tokenizer, [texts[start + r] for r in rows], settings, device,
                                             num_layers)
                for name, values in vectors.items():
                    buffers[name][rows] = values
                summary["tokens"] += tokens
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{summary['tokens'] / (time.perf_counter() - started):,.0f}", refresh=False)
            try:
                writer.write_block(split, int(block), buffers)
            except Float16Overflow as overflow:
                print(f"\n{overflow}: storing {split}/{overflow.pooling} as float32 and redoing {split} "
                      f"(recorded in the store's dtype_fallback)", file=sys.stderr)
                writer.promote_to_float32(overflow)
                bar.total += stop   # the split is redone from its first block
                split_queue.insert(0, split)
                break
            summary["texts"] += stop - start
    bar.close()
    seconds = time.perf_counter() - started
    summary.update({
        "seconds": round(seconds, 3), "model_load_seconds": round(load_seconds, 3),
        "texts_per_s": round(summary["texts"] / seconds, 2), "tokens_per_s": round(summary["tokens"] / seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    writer.record_run(summary)
    print(f"{model_name} x {dataset_name}: {summary['texts']:,} texts, {summary['tokens']:,} tokens in "
          f"{seconds:,.1f} s ({summary['tokens_per_s']:,.0f} tokens/s), peak RSS {summary['peak_rss_mb']:,.0f} MB",
          file=sys.stderr)
    return summary
