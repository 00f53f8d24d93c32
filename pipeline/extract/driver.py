"""Stage 1: stream a corpus through a frozen model once, pooling every layer into the store.

Work goes block by block (block = `block_rows` rows in corpus order = one Zarr shard). Inside a
block, texts are sorted by length and batched under a token budget; each layer is pooled as the
forward pass produces it; the block is written, then marked done. A rerun skips done blocks, and
since a block's batches depend only on its own rows, a resumed store is bit-identical.
"""

from __future__ import annotations

import contextlib
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

from pipeline.config.params import Params
from pipeline.config.sections import ExtractSettings
from pipeline.core.devices import resolve_device
from pipeline.core.fingerprint import package_versions
from pipeline.extract import compiled_forward
from pipeline.extract.block_loop import BlockLoop
from pipeline.extract.forward import Forward, PositionRule, count_tokens, model_skeleton, position_rule, resolve_compute_dtype
from pipeline.extract.world import LocalWorld, World, agree, from_rank_zero, raise_first, status_of
from pipeline.hidden_states.attention import entropy_supported
from pipeline.hidden_states.layer_tap import find_blocks, text_config
from pipeline.sources.corpora import Corpus, read_corpus
from pipeline.sources.models import is_decoder, load_model, read_source
from pipeline.store.format import POSITIONS_KEY, Float16Overflow, entropy_sample
from pipeline.store.writer import SplitRows, StoreWriter


def fingerprint_for(params: Params, model_name: str, corpus: Corpus, source: dict[str, Any],
                    compute_dtype: torch.dtype, forward: str = "eager",
                    settings: ExtractSettings | None = None, positions: PositionRule = PositionRule()) -> dict[str, Any]:
    """What the stored numbers depend on; a store whose fingerprint differs is refused. `forward`: the
    resolved extract.forward (eager | compiled: they round differently); eager leaves no key, as before.
    `settings`: the extraction settings as resolved for this model (default: the corpus's). `positions`:
    a model that numbers positions from elsewhere than 0 records where (POSITIONS_KEY): its stores from
    before issue 21 fed it 0-based positions, and are refused; every other model's fingerprint is as before."""
    settings = settings or params.extract_for(corpus.name)
    return {
        "model": {"name": model_name, "source": params.model(model_name).source,
                  "weights_sha256": source["weights_sha256"], "tokenizer_sha256": source["tokenizer_sha256"]},
        "extract": {"max_len": settings.max_len, "dtype": settings.dtype, "poolings": list(settings.poolings),
                    "block_rows": settings.block_rows, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                    "attention": settings.attention, "attention_entropy_rows": settings.attention_entropy_rows,
                    "token_budget": settings.token_budget,    # batch shapes move stored values (docs/store.md)
                    **({"forward": forward} if forward != "eager" else {}),
                    **({POSITIONS_KEY: positions.first} if positions.first else {})},
        "dataset": {"name": corpus.name, "sha256": corpus.meta["sha256"], "label_names": corpus.label_names,
                    "carve": corpus.meta["carve"], **({"caps": corpus.meta["caps"]} if corpus.meta.get("caps") else {}),
                    **({"resplit": corpus.meta["resplit"]} if corpus.meta.get("resplit") else {})},
    }


def _split_rows(corpus: Corpus, split: str, counts: np.ndarray, truncated: np.ndarray,
                sampled: np.ndarray | None) -> SplitRows:
    data = corpus.splits[split]
    index = {name: i for i, name in enumerate(corpus.label_names)}
    return SplitRows(labels=np.array([index[label] for label in data.labels], dtype=np.int32),
                     text_id=np.array(data.ids, dtype=object), source_index=np.array(data.source_index, np.int64),
                     token_count=counts, truncated=truncated, attention_sampled=sampled)


def entropy_for_model(settings: ExtractSettings, config, model_name: str) -> ExtractSettings:
    """extract.attention_entropy_rows as it applies to this model: 0 for a model whose attention does not go
    through transformers' attention interface (MPNet), said on stderr and recorded in the fingerprint (the
    rows actually used), so the store says it has no entropy instead of the run failing after its first block."""
    if settings.attention_entropy_rows and not entropy_supported(config):
        print(f"{model_name}: its attention does not go through transformers' attention interface, so its store "
              f"gets no attention entropy (recorded: attention_entropy_rows 0 in the fingerprint)", file=sys.stderr)
        return settings.model_copy(update={"attention_entropy_rows": 0})
    return settings


def entropy_attrs(settings: ExtractSettings, seed: int) -> dict[str, Any] | None:
    """The store's record of how its attention entropy was computed, or None when it has none."""
    if not settings.attention_entropy_rows:
        return None
    return {"rows_per_block": settings.attention_entropy_rows, "seed": seed,
            "sample": "per block: numpy default_rng([seed, split index in (train, validation, test), block])"
                      ".choice(block rows, rows_per_block, replace=False); row metadata attention_sampled",
            "layers": "column 0 = embedding output: NaN (no attention); column i = block i",
            "value": "mean over the text's real query tokens of the entropy (nats) of each query's attention "
                     "distribution over the keys (causal for decoders), heads averaged, float32",
            "kernel": "the model's eager attention, in an extra forward pass over the sampled rows "
                      "(the fast kernels give no probabilities)",
            "unsampled": "NaN"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the pieces every process runs -------------------------------------------------------------
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
    settings = entropy_for_model(settings, config, model_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.trust_remote_code)
    skeleton = model_skeleton(config, spec.trust_remote_code)
    find_blocks(skeleton)            # a family whose layers cannot be tapped stops here, before any store exists
    forward = compiled_forward.resolve_forward(settings.forward, device, config.model_type)
    if forward == "compiled":        # compiled code is cached per machine, under the store
        compiled_forward.use_compile_cache(params.store / "compile_cache")

    info = {"versions": package_versions(), "model_dir": str(model_dir), "model_origin": source.get("origin"),
            "decoder": is_decoder(config), "model_type": config.model_type, "dataset_source": corpus.meta["source"],
            "layer_convention": "0 = embedding output, i = output of block i, last = last_hidden_state"}
    writer = StoreWriter(params.embeddings_path(model_name, dataset_name),
                         fingerprint_for(params, model_name, corpus, source, compute_dtype, forward, settings,
                                         position_rule(skeleton)), info,
                         num_layers=num_layers, dim=dim, poolings=settings.poolings,
                         block_rows=settings.block_rows, dtype=settings.dtype, compressor=settings.compressor,
                         rebuild=rebuild and create, attention_entropy=entropy_attrs(settings, params.data.seed))
    dropped = corpus.meta["dropped"]
    for split in corpus.splits if create else ():
        if split not in writer.root.attrs.get("splits", {}):
            counts, truncated = count_tokens(tokenizer, corpus.splits[split].texts, settings.max_len)
            sampled = (entropy_sample(len(counts), settings.block_rows, settings.attention_entropy_rows,
                                      params.data.seed, split) if writer.entropy else None)
            writer.init_split(split, _split_rows(corpus, split, counts, truncated, sampled),
                              [d for d in dropped if d["split"] == split])
    return Extraction(spec, model_dir, corpus, compute_dtype, num_layers, dim, tokenizer, writer)


def pending_work(writer: StoreWriter, splits) -> list[tuple[str, int]]:
    """(split, block) pairs not yet done, in split order then block order."""
    return [(split, int(block)) for split in splits for block in np.flatnonzero(~writer.done_blocks(split))]


def block_costs(writer: StoreWriter, work: list[tuple[str, int]], max_len: int) -> list[int]:
    """Tokens per pending block (after truncation): what a block costs to extract."""
    counts = {split: np.minimum(writer.root[split]["token_count"][:], max_len) for split in {s for s, _ in work}}
    costs = []
    for split, block in work:
        start, stop = writer.block_range(split, block)
        costs.append(int(counts[split][start:stop].sum()))
    return costs


# -- the one driver --------------------------------------------------------------------------------
def extract(params: Params, model_name: str, dataset_name: str, rebuild: bool = False,
            show_progress: bool = True, wait_for_lock: bool = False) -> dict[str, Any]:
    """Extract every split of one model x dataset into its store in this process; returns the run's summary."""
    world = LocalWorld(resolve_device(params.extract_for(dataset_name).device))
    return run_world(world, params, model_name, dataset_name, rebuild, show_progress, wait_for_lock)


def run_world(world: World, params: Params, model_name: str, dataset_name: str, rebuild: bool = False,
              show_progress: bool = True, wait_for_lock: bool = False,
              forward: Forward | None = None) -> dict[str, Any] | None:
    """Run this rank of an extraction; rank 0 returns the run's summary, the others None.

    One writer per store (pipeline/core/lock.py: rank 0 holds the run lock for the whole run; a second writer
    fails naming the holder, or waits with `wait_for_lock`); a full disk or a file-size limit becomes a
    StoreSpaceError saying how much is needed.
    """
    from pipeline.core.lock import run_lock
    from pipeline.store.verify import remove_leftovers, space_error

    path = params.embeddings_path(model_name, dataset_name)
    with contextlib.ExitStack() as stack:
        error = None
        try:
            if world.rank == 0:
                stack.enter_context(run_lock(path, wait=wait_for_lock))
                remove_leftovers(path)   # temporary files of writes a killed run left half done
        except Exception as caught:      # another writer holds the lock: every rank stops
            error = caught
        agree(world, error)
        try:
            return _drive(world, params, model_name, dataset_name, rebuild, show_progress, forward)
        except OSError as caught:
            raise space_error(caught, path, params.extract) or caught


def _drive(world: World, params: Params, model_name: str, dataset_name: str, rebuild: bool,
           show_progress: bool, forward: Forward | None) -> dict[str, Any] | None:
    """Rounds of: rank 0 lists the pending blocks and broadcasts them (a rank reading the `_done` marks
    itself could read them after a faster rank marked blocks done, deal differently and leave blocks to
    nobody); `world.share` deals them; each rank runs BlockLoop on its share; float16 overflows are
    gathered and rank 0 promotes those arrays, and the next round redoes their splits. The last gather
    of every rank's counts is also the barrier after every rank's last done mark."""
    settings = params.extract_for(dataset_name)
    device, wall = world.device, time.perf_counter()
    job, error = None, None
    if world.rank == 0:              # creates the store, or checks its fingerprint; inits the splits
        try:
            job = open_extraction(params, model_name, dataset_name, device, rebuild=rebuild, create=True)
        except Exception as caught:
            error = caught
    agree(world, error)
    if world.rank != 0:              # a rank that cannot open it stops every rank, none waits at a collective
        try:
            job = open_extraction(params, model_name, dataset_name, device, create=False)
        except Exception as caught:
            error = caught
    agree(world, error)
    writer, corpus = job.writer, job.corpus

    loop, bar, blocks, rounds, dealt_tokens, load_seconds, compute_seconds = None, None, 0, 0, 0, 0.0, 0.0
    while True:
        work, costs = from_rank_zero(world, lambda: _pending_with_costs(writer, corpus.splits, settings.max_len))
        if not work:
            break
        rounds += 1
        mine, loads = world.share(work, costs)
        dealt_tokens += loads[world.rank]
        if world.size > 1 and world.rank == 0 and rounds == 1:
            print(f"{model_name} x {dataset_name}: {len(work)} blocks on {world.size} ranks, tokens per rank "
                  f"{loads} (LPT deal)", file=sys.stderr)
        overflows, error = [], None
        try:
            if mine and loop is None:
                started = time.perf_counter()
                model, _ = load_model(job.model_dir, job.spec, str(device), job.compute_dtype, settings.attention)
                load_seconds = time.perf_counter() - started
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                loop = BlockLoop(writer, lambda split: corpus.splits[split].texts, job.tokenizer, model,
                                 settings, device, forward)
            if bar is None:
                bar = tqdm(total=0, unit="text", disable=not show_progress, dynamic_ncols=True, position=world.rank,
                           desc=(f"rank {world.rank} " if world.size > 1 else "") + f"{model_name} x {dataset_name}",
                           mininterval=2.0, file=sys.stderr)
            bar.total += sum(writer.block_range(s, b)[1] - writer.block_range(s, b)[0] for s, b in mine)
            if mine:
                started = time.perf_counter()
                overflows = loop.run(mine, bar)
                compute_seconds += time.perf_counter() - started
                blocks += len(mine)
        except Exception as caught:
            error = caught
        reports = world.gather({"error": status_of(error), "overflows": [(o.split, o.pooling, o.peak) for o in overflows]})
        if error is not None:
            raise error
        raise_first([r["error"] for r in reports])
        found = {}
        for report in reports:
            for split, pooling, peak in report["overflows"]:
                found.setdefault((split, pooling), peak)
        if not found:
            break
        if world.rank == 0:
            try:
                for (split, pooling), peak in sorted(found.items()):
                    overflow = Float16Overflow(split, pooling, peak)
                    print(f"\n{overflow}: storing {split}/{pooling} as float32 and redoing {split} "
                          f"(recorded in the store's dtype_fallback)", file=sys.stderr)
                    writer.promote_to_float32(overflow)
            except Exception as caught:
                error = caught
        agree(world, error)          # also the barrier: no rank lists the next round before the promotion
    if bar is not None:
        bar.close()
    mine = {"rank": world.rank, "device": str(device), "blocks": blocks,
            "texts": loop.texts_done if loop else 0, "tokens": loop.tokens if loop else 0,
            "dealt_tokens": dealt_tokens, "seconds": round(compute_seconds, 3),
            "store_write_seconds": round(loop.write_seconds if loop else 0.0, 3),
            "attention_entropy_seconds": round(loop.entropy_seconds if loop else 0.0, 3),
            "model_load_seconds": round(load_seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None}
    ranks = world.gather(mine)   # the barrier: every rank's blocks and done marks are written by now
    return _record(world, writer, ranks, model_name, dataset_name, settings, job, wall) if world.rank == 0 else None


def _pending_with_costs(writer: StoreWriter, splits, max_len: int) -> tuple[list[tuple[str, int]], list[int]]:
    work = pending_work(writer, splits)
    return work, block_costs(writer, work, max_len)


def _record(world: World, writer: StoreWriter, ranks: list[dict[str, Any]], model_name: str, dataset_name: str,
            settings: ExtractSettings, job: Extraction, wall: float) -> dict[str, Any]:
    """The run's summary from every rank's counts; recorded in the store unless nothing was left to do."""
    total = {k: sum(r[k] for r in ranks) for k in ("blocks", "texts", "tokens")}
    summary = {"model": model_name, "dataset": dataset_name, **total, "seconds": 0.0, "device": str(world.device),
               "compute_dtype": str(job.compute_dtype).removeprefix("torch."), "token_budget": settings.token_budget,
               "attention": settings.attention, **world.describe()}
    if total["blocks"] == 0:
        print(f"{model_name} x {dataset_name}: store complete, nothing to extract", file=sys.stderr)
        return summary
    seconds = max(r["seconds"] for r in ranks) or 1e-9
    busy = [r["seconds"] for r in ranks]
    gpu = [r["peak_gpu_mb"] for r in ranks if r["peak_gpu_mb"] is not None]
    summary.update({
        "seconds": round(seconds, 3), "wall_seconds": round(time.perf_counter() - wall, 3),
        "model_load_seconds": round(max(r["model_load_seconds"] for r in ranks), 3),
        "store_write_seconds": round(max(r["store_write_seconds"] for r in ranks), 3),
        "attention_entropy_rows": writer.entropy["rows_per_block"] if writer.entropy else 0,   # as applied to this model
        "attention_entropy_seconds": round(max(r["attention_entropy_seconds"] for r in ranks), 3),
        "texts_per_s": round(total["texts"] / seconds, 2), "tokens_per_s": round(total["tokens"] / seconds, 1),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "peak_gpu_mb": max(gpu) if gpu else None,
        "spread_seconds": round((max(busy) - min(busy)) / seconds, 4),   # 0 = all ranks finished together
        "ranks": ranks,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    writer.record_run(summary)
    on = f" on {world.size} ranks" if world.size > 1 else ""
    print(f"{model_name} x {dataset_name}: {total['texts']:,} texts, {total['tokens']:,} tokens{on} in "
          f"{seconds:,.1f} s ({summary['tokens_per_s']:,.0f} tokens/s), peak RSS {summary['peak_rss_mb']:,.0f} MB"
          + (f"; per-rank seconds {busy}, spread {summary['spread_seconds']:.1%}" if world.size > 1 else ""),
          file=sys.stderr)
    return summary
