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
  4. each rank runs exactly the single-process driver and block code (pipeline.extract.driver.run_world with a
     FabricWorld; a single process is a LocalWorld of size 1, so both go through one function) on its
     blocks: it writes its own shards and marks them done. Two ranks never touch the same chunk
     (`_done` and `_digest` have one chunk per block, so no read-modify-write is shared);
  5. float16 overflows are gathered; rank 0 promotes those arrays to float32 and the loop goes again
     on what is pending; otherwise rank 0 gathers every rank's tokens and seconds and records the run
     with the spread. That gather is also the barrier after every rank's last block and done mark
     (BlockLoop.run returns only once its writer thread has finished): rank 0, and so the stage,
     returns only when the whole store is final.
A killed run resumes with any number of processes: devices/num_nodes are not in the fingerprint and
the pending set is read from the `_done` marks. The result is bit-identical to a single-process run
because a block's vectors depend only on its own rows.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.config.sections import ExtractSettings
from pipeline.config.params import Params
from pipeline.extract.driver import run_world


def launched_externally() -> bool:
    """Started by torchrun (or another launcher that sets RANK/WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and ("RANK" in os.environ or "LOCAL_RANK" in os.environ)


def requested(settings: ExtractSettings) -> bool:
    """Whether the extraction runs on more than one process."""
    return settings.devices * settings.num_nodes > 1 or launched_externally()


# -- the deal ------------------------------------------------------------------------------------
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


class FabricWorld:
    """The ranks of a Fabric launch as a pipeline.extract.world.World: collectives through torch.distributed."""

    def __init__(self, fabric):
        self.fabric = fabric
        self.rank, self.size, self.device = fabric.global_rank, fabric.world_size, fabric.device

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        return self.fabric.broadcast(obj, src=0)

    def share(self, work, costs):
        """This rank's blocks of the LPT deal, and every rank's load."""
        assignment, loads = deal(work, costs, self.size)
        return assignment[self.rank], loads

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.size, "num_nodes": getattr(self.fabric.strategy, "num_nodes", 1), "strategy": "ddp"}


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


def run_rank(fabric, params: Params, model_name: str, dataset_name: str, rebuild: bool = False,
             show_progress: bool = True, wait_for_lock: bool = False) -> dict[str, Any] | None:
    """This Fabric rank's part of the extraction (rank 0 holds the store's run lock for the whole run)."""
    return run_world(FabricWorld(fabric), params, model_name, dataset_name, rebuild, show_progress, wait_for_lock)
