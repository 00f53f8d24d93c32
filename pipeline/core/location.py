"""Where an embeddings store lives: a local path or an fsspec URL (s3://bucket/prefix, gs://, ...).

Local paths keep the exact behaviour of a plain folder (zarr's LocalStore, atomic file writes).
URLs go through zarr's FsspecStore; every object write there (S3 PUT) is atomic too, so a killed run
leaves whole chunks and the `_done` marks keep their meaning.

Credentials never come from params.yaml: s3fs/botocore read the usual environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION, instance roles). A
non-AWS endpoint (MinIO, Ceph, moto) comes from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

Location = str | Path


def is_url(location: Location) -> bool:
    return isinstance(location, str) and "://" in location


def as_location(value: Location, root: Path | None = None) -> Location:
    """A URL stays a string; a path is resolved against `root` (params.yaml's folder) when relative."""
    if is_url(value):
        return str(value).rstrip("/")
    path = Path(value)
    return path if root is None or path.is_absolute() else root / path


def join(location: Location, *parts: str) -> Location:
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for a URL, from the environment only."""
    protocol = url.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def zarr_store(location: Location, read_only: bool = False):
    """What zarr.open_group takes: the folder as a string, or an FsspecStore for a URL."""
    if not is_url(location):
        return str(location)
    from zarr.storage import FsspecStore
    return FsspecStore.from_url(str(location), storage_options=storage_options(str(location)),
                                read_only=read_only)


def exists(location: Location) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = filesystem(str(location))
    fs.invalidate_cache()
    return fs.exists(path) and bool(fs.ls(path, detail=False))


def is_empty(location: Location) -> bool:
    if not is_url(location):
        return not any(Path(location).iterdir())
    return not exists(location)


def remove(location: Location, first: str | None = None) -> None:
    """Delete a folder or prefix; `first` (a name inside it) is deleted before everything else."""
    if not is_url(location):
        if first is not None and (Path(location) / first).is_file():
            os.remove(Path(location) / first)
        shutil.rmtree(location)
        return
    fs, path = filesystem(str(location))
    if first is not None and fs.exists(f"{path}/{first}"):
        fs.rm_file(f"{path}/{first}")
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.invalidate_cache()


def display(location: Location) -> str:
    return str(location)
