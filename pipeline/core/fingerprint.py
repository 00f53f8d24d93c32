"""Hashes that identify what a store was built from, and a readable diff of two fingerprints."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "zarr", "numcodecs", "numpy")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Iterable[str | Path]) -> str:
    """One hash over several files' names and contents, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def sha256_rows(texts: Iterable[str], labels: Iterable[Any]) -> str:
    """Content hash of a split: texts and labels in order, unambiguously separated."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        encoded = json.dumps([text, label], ensure_ascii=False).encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def differences(stored: dict[str, Any], current: dict[str, Any],
                sides: tuple[str, str] = ("store has", "params give")) -> list[str]:
    """Human-readable lines naming each key whose value differs; `sides` say who holds each value."""
    old, new = _flatten(stored), _flatten(json.loads(json.dumps(current)))
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            lines.append(f"{key}: {sides[0]} {old.get(key, '<absent>')!r}, {sides[1]} {new.get(key, '<absent>')!r}")
    return lines
