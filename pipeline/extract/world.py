"""The processes of one extraction: a single process is a world of size 1 (LocalWorld); Fabric
ranks are pipeline/distributed.FabricWorld. The driver (pipeline/extract.run_world) talks only to a
World, so one code path serves both.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from pipeline.core.errors import PipelineError


class World(Protocol):
    """The processes of one extraction. Rank 0 creates the store, lists what is pending and records the
    run; `share` gives each rank its blocks. A single process is a world of size 1 (LocalWorld)."""
    rank: int
    size: int
    device: torch.device

    def gather(self, obj: Any) -> list[Any]: ...
    def broadcast(self, obj: Any) -> Any: ...           # rank 0's obj, on every rank
    def share(self, work: list[tuple[str, int]], costs: list[int]) -> tuple[list[tuple[str, int]], list[int]]: ...
    def describe(self) -> dict[str, Any]: ...           # run-record keys: world_size, num_nodes, strategy


class LocalWorld:
    """One process: collectives are the identity, and it takes every pending block in split then block order."""
    rank, size = 0, 1

    def __init__(self, device: torch.device):
        self.device = device

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def share(self, work, costs):
        return work, [sum(costs)]

    def describe(self) -> dict[str, Any]:
        return {"world_size": 1, "num_nodes": 1, "strategy": "single"}


def status_of(error: BaseException | None):
    if error is None:
        return None
    if isinstance(error, PipelineError):
        return "pipeline", str(error)
    return "other", f"{type(error).__name__}: {error}"


def raise_first(statuses: list[Any]) -> None:
    """Raise the first failed rank's error, as rank 0 saw it or naming the rank."""
    for rank, status in enumerate(statuses):
        if status:
            kind, message = status
            raise (PipelineError if kind == "pipeline" else RuntimeError)(f"rank {rank}: {message}" if rank else message)


def agree(world: World, error: BaseException | None) -> None:
    """Every rank learns whether any failed: a failed rank raises its own error, the others the first
    failed rank's, so none waits forever at a collective."""
    statuses = world.gather(status_of(error))
    if error is not None:
        raise error
    raise_first(statuses)


def from_rank_zero(world: World, compute: Callable[[], Any]) -> Any:
    """What `compute` returns on rank 0, broadcast to every rank (rank 0's error stops them all)."""
    found, error = None, None
    if world.rank == 0:
        try:
            found = compute()
        except Exception as caught:
            error = caught
    found, status = world.broadcast((found, status_of(error)))
    if error is not None:
        raise error
    raise_first([status])
    return found
