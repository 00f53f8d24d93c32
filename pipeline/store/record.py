"""The local record of a store that lives elsewhere (`paths.embeddings`: a URL, or a folder outside store/).

DVC cannot hash a store it cannot see, so where paths.embeddings is set the extract stage's output, the
folder store/embeddings/<dataset>/<model>, holds one file instead of the store: where the store lives and
what identifies its content (its build, settings and every block's digest). The file changes exactly when
the store does, so `dvc status` and `dvc repro` see a remote store change without reading it, and Stage 2
reruns; `dvc push` shares the record, and a fresh clone's Stage 2 reads the store where the record says.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline.core import location
from pipeline.core.atomic import write_json_atomic
from pipeline.core.errors import OutputError
from pipeline.store.reader import EmbeddingStore
from pipeline.store.format import build_of

RECORD = "location.json"


def record_folder(store_root: Path, model: str, dataset: str) -> Path:
    """The folder DVC tracks as the extract stage's output (dvc.yaml: store/embeddings/<dataset>/<model>)."""
    return Path(store_root) / "embeddings" / dataset / model


def check_record_folder(folder: Path, where: location.Location) -> None:
    """Before extracting elsewhere: the tracked folder must be free for the record. A local store left there
    (from before paths.embeddings was set) is refused, not deleted: it may be the only copy of its vectors."""
    if folder.is_dir() and any(p.name != RECORD for p in folder.iterdir()):
        raise OutputError(f"{folder} holds a local store, but paths.embeddings puts this model x dataset at "
                          f"{location.display(where)}; that folder is the extract stage's output, where DVC tracks "
                          f"a record of the store. Move the local store away (or delete it) and rerun")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file; it must be a folder for the record of the store at "
                          f"{location.display(where)}")


def identity(store: EmbeddingStore) -> dict[str, Any]:
    """What the record holds: the store's place, build, settings, rows and a digest of every block's digest."""
    generation, settings = build_of(store.attrs)
    blocks = hashlib.sha256()
    for split in store.splits:
        blocks.update(split.encode() + repr(store.completion(split)).encode() + store.stored_digests(split).tobytes())
    return {"embeddings": location.display(store.path), "generation": generation,
            "settings_sha256": hashlib.sha256(settings.encode()).hexdigest(),
            "rows": {split: store.num_rows(split) for split in store.splits},
            "blocks_sha256": blocks.hexdigest()}


def write_record(folder: Path, where: location.Location) -> Path:
    """Record the store at `where` in `folder` (after extract: the store is complete)."""
    check_record_folder(folder, where)
    write_json_atomic(folder / RECORD, identity(EmbeddingStore(where)))
    return folder / RECORD
