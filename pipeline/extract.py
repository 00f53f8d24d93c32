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
from concurrent.futures import Future, ThreadPoolExecutor
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
from pipeline.devices import resolve_device
from pipeline.fingerprint import package_versions
from pipeline.layer_tap import run_with_layers, text_config
from pipeline.models import is_decoder, load_model, read_source
from pipeline.pooling import LayerPooler
from pipeline.store import Float16Overflow, SplitRows, StoreWriter

COUNT_CHUNK = 4096


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
    tokens = int(mask.sum())
    content = mask & ~special
    if device.type == "cuda":   # pinned host memory: the copies below run asynchronously
        inputs = {k: v.pin_memory() for k, v in inputs.items()}
        mask, content = mask.pin_memory(), content.pin_memory()
    return Encoded({k: v.to(device, non_blocking=True) for k, v in inputs.items()}, mask.to(device, non_blocking=True),
                   content.to(device, non_blocking=True), tokens)


def pool_batch(model, tokenizer, texts: list[str], settings: ExtractSettings, device: torch.device,
               num_layers: int, stop_after: int | None = None, poolings=None,
               batch: Encoded | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Pooled vectors [B, layers, D] float32 per pooling for one batch, and its real token count.

    `batch`: the texts already encoded (the block loop tokenises the next batch while this one runs).
    Every layer is pooled on the device into one [poolings, B, layers, D] tensor as the forward pass
    produces it (LayerPooler: one float32 copy per layer, no host syncs); the tensor is copied to
    the host once per batch (pinned, asynchronous on a GPU).
    """
    poolings = list(poolings or settings.poolings)
    if batch is None:
        batch = encode(tokenizer, texts, settings.max_len, settings.padding_side, device)
    layers = num_layers if stop_after is None else stop_after + 1
    dim = text_config(model.config).hidden_size
    out = torch.empty((len(poolings), len(texts), layers, dim), dtype=torch.float32, device=device)

    with torch.inference_mode():
        pooler = LayerPooler(batch.mask, batch.content, poolings)

        def on_layer(index: int, hidden: torch.Tensor) -> None:
            pooler(hidden, {name: out[i, :, index] for i, name in enumerate(poolings)})

        run_with_layers(model, batch.inputs, on_layer, stop_after=stop_after)
    if device.type == "cuda":
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        out = host
    values = out.numpy()
    return {name: values[i] for i, name in enumerate(poolings)}, batch.tokens


def fingerprint_for(params: Params, model_name: str, corpus: Corpus, source: dict[str, Any],
                    compute_dtype: torch.dtype) -> dict[str, Any]:
    """What the stored numbers depend on; a store whose fingerprint differs is refused."""
    settings = params.extract_for(corpus.name)
    return {
        "model": {"name": model_name, "source": params.model(model_name).source,
                  "weights_sha256": source["weights_sha256"], "tokenizer_sha256": source["tokenizer_sha256"]},
        "extract": {"max_len": settings.max_len, "dtype": settings.dtype, "poolings": list(settings.poolings),
                    "block_rows": settings.block_rows, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                    "attention": settings.attention,
                    "token_budget": settings.token_budget},   # batch shapes move stored values (README: The store)
        "dataset": {"name": corpus.name, "sha256": corpus.meta["sha256"], "label_names": corpus.label_names,
                    "carve": corpus.meta["carve"], **({"caps": corpus.meta["caps"]} if corpus.meta.get("caps") else {}),
                    **({"resplit": corpus.meta["resplit"]} if corpus.meta.get("resplit") else {})},
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
            show_progress: bool = True, wait_for_lock: bool = False) -> dict[str, Any]:
    """Extract every split of one model x dataset into its store; returns the run's summary.

    One writer per store (pipeline/lock.py: a second one fails naming the holder, or waits with
    `wait_for_lock`); a full disk or a file-size limit becomes a StoreSpaceError saying how much is needed.
    """
    from pipeline.lock import run_lock
    from pipeline.verify import remove_leftovers, space_error
    path = params.embeddings_path(model_name, dataset_name)
    try:
        with run_lock(path, wait=wait_for_lock):
            remove_leftovers(path)   # temporary files of writes a killed run left half done
            return _extract(params, model_name, dataset_name, rebuild, show_progress)
    except OSError as error:
        raise space_error(error, path, params.extract) or error


# -- the pieces every process runs (single process here, many in pipeline/distributed.py) -------------
@dataclass
class Extraction:
    """Everything one process of a model x dataset extraction needs before the model is loaded."""
    spec: Any
    model_dir: Path
    corpus: Corpus
    compute_dtype: torch.dtype
    num_layers: int
    dim: int
    tokenizer: Any
    writer: StoreWriter


def open_extraction(params: Params, model_name: str, dataset_name: str, device: torch.device,
                    rebuild: bool = False, create: bool = True) -> Extraction:
    """Read the model's config and tokenizer and the corpus, and open the store. create: also create it
    (or replace it with `rebuild`) and init its splits (token counts); distributed runs do that on rank 0
    only, and open it with create=False on the other ranks once rank 0 is done."""
    from transformers import AutoConfig, AutoTokenizer

    settings = params.extract_for(dataset_name)
    spec = params.model(model_name)
    model_dir = params.model_dir(model_name)
    source = read_source(model_dir)
    corpus = read_corpus(params.data_dir(dataset_name))
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
                         rebuild=rebuild and create)
    dropped = corpus.meta["dropped"]
    for split in corpus.splits if create else ():
        if split not in writer.root.attrs.get("splits", {}):
            counts, truncated = count_tokens(tokenizer, corpus.splits[split].texts, settings.max_len)
            writer.init_split(split, _split_rows(corpus, split, counts, truncated),
                              [d for d in dropped if d["split"] == split])
    return Extraction(spec, model_dir, corpus, compute_dtype, num_layers, dim, tokenizer, writer)


def pending_work(writer: StoreWriter, splits) -> list[tuple[str, int]]:
    """(split, block) pairs not yet done, in split order then block order."""
    return [(split, int(block)) for split in splits for block in np.flatnonzero(~writer.done_blocks(split))]


def process_blocks(writer: StoreWriter, work: list[tuple[str, int]], model, tokenizer, corpus: Corpus,
                   settings: ExtractSettings, device: torch.device, num_layers: int, dim: int,
                   summary: dict[str, Any], bar=None, started: float | None = None,
                   stop_on_overflow: bool = True) -> list[Float16Overflow]:
    """Compute, write and mark done the given (split, block) pairs in the given order: the one block
    code path of every process. A float16 overflow is returned, not handled: stop_on_overflow returns
    at the first (single process: the caller promotes the array and redoes the split); otherwise the
    rest of that split's blocks are skipped and the other splits go on (distributed ranks)."""
    started = time.perf_counter() if started is None else started
    overflows: list[Float16Overflow] = []
    token_counts: dict[str, np.ndarray] = {}
    summary.setdefault("store_write_seconds", 0.0)
    # Two helper threads overlap host work with compute: one tokenises the next batch, one writes the
    # previous block (compress + write + digest + mark done, in that order, as write_block does). At
    # most one write is in flight and its outcome is collected before the next block is handed over,
    # so blocks are still marked done in order, only after their data, and a crash never marks an
    # unwritten block done. A block's numbers depend only on its own rows, as before.
    tokenise = ThreadPoolExecutor(1, thread_name_prefix="layerfuse-tokenise")
    store = ThreadPoolExecutor(1, thread_name_prefix="layerfuse-write")
    in_flight: tuple[Future, str, int, int] | None = None

    def timed_write(split: str, block: int, buffers: dict[str, np.ndarray]) -> None:
        began = time.perf_counter()
        try:
            writer.write_block(split, block, buffers)
        finally:
            summary["store_write_seconds"] = round(summary["store_write_seconds"] + time.perf_counter() - began, 3)

    def settle() -> bool:
        """Collect the write in flight; False when it overflowed float16 and the caller must stop."""
        nonlocal in_flight
        if in_flight is None:
            return True
        future, split, rows, stop = in_flight
        in_flight = None
        try:
            future.result()
        except Float16Overflow as overflow:
            overflows.append(overflow)
            if bar is not None:
                bar.total += stop   # the split is redone from its first block
            return not stop_on_overflow
        summary["texts"] += rows
        return True

    def encoded(texts: list[str]) -> Encoded:
        return encode(tokenizer, texts, settings.max_len, settings.padding_side, device)

    try:
        for split, block in work:
            if any(o.split == split for o in overflows):
                continue
            texts = corpus.splits[split].texts
            if split not in token_counts:
                token_counts[split] = writer.root[split]["token_count"][:]
            counts = token_counts[split]
            start, stop = writer.block_range(split, int(block))
            lengths = np.minimum(counts[start:stop], settings.max_len)
            buffers = {p: np.empty((stop - start, num_layers, dim), dtype=np.float32) for p in settings.poolings}
            batches = [(rows, [texts[start + r] for r in rows])
                       for rows in token_budget_batches(lengths, settings.token_budget)]
            upcoming = tokenise.submit(encoded, batches[0][1]) if batches else None
            for index, (rows, batch_texts) in enumerate(batches):
                batch = upcoming.result()
                upcoming = tokenise.submit(encoded, batches[index + 1][1]) if index + 1 < len(batches) else None
                vectors, tokens = pool_batch(model, tokenizer, batch_texts, settings, device, num_layers,
                                             batch=batch)
                for name, values in vectors.items():
                    buffers[name][rows] = values
                summary["tokens"] += tokens
                if bar is not None:
                    bar.update(len(rows))
                    bar.set_postfix(tok_s=f"{summary['tokens'] / (time.perf_counter() - started):,.0f}",
                                    refresh=False)
            if not settle():
                return overflows            # this block is dropped unwritten: its split is redone
            if any(o.split == split for o in overflows):
                continue
            in_flight = (store.submit(timed_write, split, int(block), buffers), split, stop - start, stop)
        settle()
        return overflows
    finally:
        tokenise.shutdown(wait=True, cancel_futures=True)
        store.shutdown(wait=True)           # an error above still lets a started write finish whole


def _extract(params: Params, model_name: str, dataset_name: str, rebuild: bool = False,
             show_progress: bool = True) -> dict[str, Any]:
    settings = params.extract_for(dataset_name)
    device = resolve_device(settings.device)
    job = open_extraction(params, model_name, dataset_name, device, rebuild=rebuild)
    spec, model_dir, corpus, writer = job.spec, job.model_dir, job.corpus, job.writer
    compute_dtype, num_layers, dim, tokenizer = job.compute_dtype, job.num_layers, job.dim, job.tokenizer

    pending = {s: np.flatnonzero(~writer.done_blocks(s)).tolist() for s in corpus.splits}
    total_rows = sum(writer.block_range(s, b)[1] - writer.block_range(s, b)[0] for s in pending for b in pending[s])
    summary = {"model": model_name, "dataset": dataset_name, "texts": 0, "tokens": 0, "seconds": 0.0,
               "blocks": sum(map(len, pending.values())), "device": str(device),
               "compute_dtype": str(compute_dtype).removeprefix("torch."), "token_budget": settings.token_budget,
               "attention": settings.attention}
    if total_rows == 0:
        print(f"{model_name} x {dataset_name}: store complete, nothing to extract", file=sys.stderr)
        return summary

    started = time.perf_counter()
    model, _ = load_model(model_dir, spec, str(device), compute_dtype, settings.attention)
    load_seconds = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total_rows, unit="text", disable=not show_progress, dynamic_ncols=True,
               desc=f"{model_name} x {dataset_name}", mininterval=2.0, file=sys.stderr)
    started = time.perf_counter()
    work = pending_work(writer, corpus.splits)
    while work:
        overflows = process_blocks(writer, work, model, tokenizer, corpus, settings, device, num_layers, dim,
                                   summary, bar, started)
        if not overflows:
            break
        overflow = overflows[0]
        print(f"\n{overflow}: storing {overflow.split}/{overflow.pooling} as float32 and redoing {overflow.split} "
              f"(recorded in the store's dtype_fallback)", file=sys.stderr)
        writer.promote_to_float32(overflow)
        work = pending_work(writer, corpus.splits)   # that split again from its first block, then the rest
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
