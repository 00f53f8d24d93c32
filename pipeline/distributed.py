"""Stage 1 on many processes: one model replica per device, across GPUs and nodes, on Lightning Fabric.

    python -m stages.extract --model M --dataset D        # params extract.devices / num_nodes / strategy
    torchrun --nnodes 2 --nproc-per-node 8 ... -m stages.extract --model M --dataset D   # joins torchrun's ranks

How the work is shared (no sampler: Lightning's DistributedSampler interleaves rows across ranks,
which puts two ranks into one chunk):
  1. rank 0 takes the store's run lock, creates or reopens the store (fingerprint check, --rebuild)
     and initialises its splits (token counts); the outcome is broadcast, so an error stops every rank;
  2. every rank opens the store; rank 0 lists the blocks still pending (whole row blocks = whole shards)
     and their tokens, and broadcasts that list: a rank that read the `_done` marks itself would read
     them later than a faster rank that is already marking blocks done, deal differently, and leave
     blocks to nobody (the cause of a store finishing with a block not done);
  3. the pending blocks are sorted by their tokens (descending) and dealt greedily to the least-loaded
     rank (LPT). The deal depends only on the broadcast list and the world size, so every rank computes
     the same one;
  4. each rank runs exactly the single-process block code (pipeline.extract.process_blocks) on its
     blocks: it writes its own shards and marks them done. Two ranks never touch the same chunk
     (`_done` and `_digest` have one chunk per block, so no read-modify-write is shared);
  5. float16 overflows are gathered; rank 0 promotes those arrays to float32 and the loop goes again
     on what is pending; otherwise rank 0 gathers every rank's tokens and seconds and records the run
     with the spread. That gather is also the barrier after every rank's last block and done mark
     (process_blocks returns only once its writer thread has finished): rank 0, and so the stage,
     returns only when the whole store is final.
A killed run resumes with any number of processes: devices/num_nodes are not in the fingerprint and
the pending set is read from the `_done` marks. The result is bit-identical to a single-process run
because a block's vectors depend only on its own rows.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from pipeline.config import ExtractSettings, Params
from pipeline.errors import PipelineError



def launched_externally() -> bool:
    """Started by torchrun (or another launcher that sets RANK/WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and ("RANK" in os.environ or "LOCAL_RANK" in os.environ)


def requested(settings: ExtractSettings) -> bool:
    """Whether the extraction runs on more than one process."""
    return settings.devices * settings.num_nodes > 1 or launched_externally()


# -- the deal ------------------------------------------------------------------------------------
def block_costs(writer, work: list[tuple[str, int]], max_len: int) -> list[int]:
    """Tokens per pending block (after truncation): what a block costs to extract."""
    counts = {split: np.minimum(writer.root[split]["token_count"][:], max_len) for split in {s for s, _ in work}}
    costs = []
    for split, block in work:
        start, stop = writer.block_range(split, block)
        costs.append(int(counts[split][start:stop].sum()))
    return costs


def deal(work: list[tuple[str, int]], costs: list[int], world_size: int) -> tuple[list[list[tuple[str, int]]], list[int]]:
    """Longest-processing-time-first: blocks by cost (descending; ties in work order), each to the
    least-loaded rank (ties: lowest rank). Deterministic, so every rank computes the same deal."""
    assignment: list[list[tuple[str, int]]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in sorted(range(len(work)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        assignment[rank].append(work[i])
        loads[rank] += costs[i]
    return assignment, loads


# -- launching -----------------------------------------------------------------------------------
def make_fabric(settings: ExtractSettings):
    """A Fabric for the extraction: strategy ddp, one process per device. Under torchrun (or SLURM's srun)
    the processes exist already and Fabric joins them; otherwise Fabric starts devices-1 more processes
    running the same command (`python -m stages.extract ...`), each told its rank by environment variables."""
    from lightning.fabric import Fabric

    devices, num_nodes = settings.devices, settings.num_nodes
    if launched_externally() and "LOCAL_WORLD_SIZE" in os.environ:   # torchrun: its numbers win
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        num_nodes = max(1, int(os.environ["WORLD_SIZE"]) // devices)
    accelerator = {"auto": "auto", "cpu": "cpu", "mps": "mps"}.get(settings.device, "cuda")
    strategy = "ddp" if settings.strategy == "auto" else settings.strategy
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)


def extract_distributed(params: Params, model_name: str, dataset_name: str, rebuild: bool = False,
                        show_progress: bool = True, wait_for_lock: bool = False) -> dict[str, Any] | None:
    """Launch (or join) the ranks and run the extraction; rank 0 returns the run's summary, others None.

    Must run from a command line (`python -m stages.extract ...`): Fabric starts the other local ranks by
    running that command again."""
    fabric = make_fabric(params.extract)
    fabric.launch()
    return run_rank(fabric, params, model_name, dataset_name, rebuild, show_progress, wait_for_lock)


# -- one rank ------------------------------------------------------------------------------------
def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _raise_if_any(statuses: list[Any]) -> None:
    """Every rank raises the first rank's error, so none waits forever at a barrier."""
    for rank, status in enumerate(statuses):
        if status:
            kind, message = status
            error = PipelineError if kind == "pipeline" else RuntimeError
            raise error(f"rank {rank}: {message}" if rank else message)


def _agreed_work(fabric, writer, splits, max_len: int) -> tuple[list[tuple[str, int]], list[int]]:
    """The pending (split, block) pairs and their costs as rank 0 reads them, the same on every rank."""
    from pipeline.extract import pending_work

    found, error = None, None
    if fabric.global_rank == 0:
        try:
            work = pending_work(writer, splits)
            found = (work, block_costs(writer, work, max_len))
        except Exception as caught:
            error = caught
    found, status = fabric.broadcast((found, _status(error)), src=0)
    _raise_if_any([status])
    return found


def _status(error: BaseException | None):
    if error is None:
        return None
    return ("pipeline" if isinstance(error, PipelineError) else "other", f"{type(error).__name__}: {error}"
            if not isinstance(error, PipelineError) else str(error))


def run_rank(fabric, params: Params, model_name: str, dataset_name: str, rebuild: bool = False,
             show_progress: bool = True, wait_for_lock: bool = False) -> dict[str, Any] | None:
    from pipeline.lock import run_lock

    from pipeline.verify import space_error

    path = params.embeddings_path(model_name, dataset_name)
    with contextlib.ExitStack() as stack:
        error = None
        try:                          # rank 0 holds the store's run lock for the whole run
            stack.enter_context(run_lock(path, wait=wait_for_lock, enabled=fabric.global_rank == 0))
        except Exception as caught:   # another writer holds it: every rank stops
            error = caught
        _raise_if_any(_gather(_status(error)))
        try:
            return _run(fabric, params, model_name, dataset_name, rebuild, show_progress)
        except OSError as caught:     # a full disk or a file-size limit: say how much is needed
            raise space_error(caught, path, params.extract) or caught


def _run(fabric, params: Params, model_name: str, dataset_name: str, rebuild: bool,
         show_progress: bool) -> dict[str, Any] | None:
    from tqdm import tqdm

    from pipeline.extract import open_extraction, peak_rss_mb, process_blocks
    from pipeline.models import load_model
    from pipeline.store import Float16Overflow

    settings = params.extract_for(dataset_name)
    rank, world = fabric.global_rank, fabric.world_size
    device = fabric.device
    wall = time.perf_counter()

    job, error = None, None
    if rank == 0:                     # creates the store, or checks its fingerprint; inits the splits
        try:
            job = open_extraction(params, model_name, dataset_name, device, rebuild=rebuild, create=True)
        except Exception as caught:
            error = caught
    _raise_if_any(_gather(_status(error)))
    if rank != 0:
        job = open_extraction(params, model_name, dataset_name, device, create=False)
    writer, corpus = job.writer, job.corpus

    summary = {"model": model_name, "dataset": dataset_name, "texts": 0, "tokens": 0, "seconds": 0.0, "blocks": 0,
               "device": str(device), "compute_dtype": str(job.compute_dtype).removeprefix("torch."),
               "token_budget": settings.token_budget}
    model, load_seconds, compute_seconds, dealt_tokens, rounds = None, 0.0, 0.0, 0, 0
    bar = None
    while True:
        work, costs = _agreed_work(fabric, writer, corpus.splits, settings.max_len)
        if not work:
            break
        rounds += 1
        assignment, loads = deal(work, costs, world)
        mine = assignment[rank]
        dealt_tokens += loads[rank]
        if rank == 0 and rounds == 1:
            print(f"{model_name} x {dataset_name}: {len(work)} blocks on {world} ranks, tokens per rank "
                  f"{loads} (LPT deal)", file=sys.stderr)
        overflows, error = [], None
        try:
            if mine and model is None:
                started = time.perf_counter()
                model, _ = load_model(job.model_dir, job.spec, str(device), job.compute_dtype,
                                      params.extract.attention)
                load_seconds = time.perf_counter() - started
            if bar is None:
                bar = tqdm(total=0, unit="text", disable=not show_progress, dynamic_ncols=True, position=rank,
                           desc=f"rank {rank} {model_name} x {dataset_name}", mininterval=2.0, file=sys.stderr)
            bar.total += sum(writer.block_range(s, b)[1] - writer.block_range(s, b)[0] for s, b in mine)
            started = time.perf_counter()
            overflows = process_blocks(writer, mine, model, job.tokenizer, corpus, settings, device, job.num_layers,
                                       job.dim, summary, bar, started, stop_on_overflow=False)
            compute_seconds += time.perf_counter() - started
            summary["blocks"] += len(mine)
        except Exception as caught:
            error = caught
        reports = _gather({"error": _status(error),
                           "overflows": [(o.split, o.pooling, o.peak) for o in overflows]})
        _raise_if_any([r["error"] for r in reports])
        found = {}
        for report in reports:
            for split, pooling, peak in report["overflows"]:
                found.setdefault((split, pooling), peak)
        if not found:
            break
        if rank == 0:
            for (split, pooling), peak in sorted(found.items()):
                overflow = Float16Overflow(split, pooling, peak)
                print(f"\n{overflow}: storing {split}/{pooling} as float32 and redoing {split} "
                      f"(recorded in the store's dtype_fallback)", file=sys.stderr)
                writer.promote_to_float32(overflow)
        fabric.barrier()
    if bar is not None:
        bar.close()

    mine = {"rank": rank, "device": str(device), "blocks": summary["blocks"], "texts": summary["texts"],
            "tokens": summary["tokens"], "dealt_tokens": dealt_tokens, "seconds": round(compute_seconds, 3),
            "model_load_seconds": round(load_seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                            if device.type == "cuda" else None)}
    ranks = _gather(mine)     # the barrier: every rank's blocks and done marks are written by now
    if rank != 0:
        return None
    total = {k: sum(r[k] for r in ranks) for k in ("blocks", "texts", "tokens")}
    if total["blocks"] == 0:
        print(f"{model_name} x {dataset_name}: store complete, nothing to extract", file=sys.stderr)
        return {**summary, **total, "world_size": world}
    seconds = max(r["seconds"] for r in ranks) or 1e-9
    busy = [r["seconds"] for r in ranks]
    summary.update(total)
    summary.update({
        "seconds": round(seconds, 3), "wall_seconds": round(time.perf_counter() - wall, 3),
        "model_load_seconds": round(max(r["model_load_seconds"] for r in ranks), 3),
        "texts_per_s": round(total["texts"] / seconds, 2), "tokens_per_s": round(total["tokens"] / seconds, 1),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "world_size": world, "num_nodes": getattr(fabric.strategy, "num_nodes", 1), "strategy": "ddp",
        "spread_seconds": round((max(busy) - min(busy)) / seconds, 4),   # 0 = all ranks finished together
        "ranks": ranks,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    writer.record_run(summary)
    print(f"{model_name} x {dataset_name}: {total['texts']:,} texts, {total['tokens']:,} tokens on {world} ranks in "
          f"{seconds:,.1f} s ({summary['tokens_per_s']:,.0f} tokens/s); per-rank seconds "
          f"{[r['seconds'] for r in ranks]}, spread {summary['spread_seconds']:.1%}", file=sys.stderr)
    return summary
