"""One way to tell a URL from a folder (issue 12): pipeline.core.location.is_url, before any Path() call,
because Path("s3://bucket/emb") is the local relative path "s3:/bucket/emb"."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.core import location
from pipeline.cli import _store_paths
from pipeline.store.verify import remove_leftovers


def test_is_url_tells_urls_from_folders():
    assert location.is_url("s3://bucket/emb") and location.is_url("gs://b/p")
    assert not location.is_url("store/embeddings") and not location.is_url(Path("s3://bucket/emb"))
    assert str(Path("s3://bucket/emb")) == "s3:/bucket/emb"      # why Path() must come after the check


def test_cli_keeps_urls_as_strings_and_folders_as_paths():
    paths = _store_paths(argparse.Namespace(paths=["s3://bucket/emb/", "store/embeddings/mr/minilm-l6"]))
    assert paths == ["s3://bucket/emb", Path("store/embeddings/mr/minilm-l6")]


def test_remove_leftovers_never_takes_a_url_for_a_local_folder(tmp_path, monkeypatch):
    """A local folder that happens to be named like the URL after Path() ("s3:/bucket/emb") is not the store."""
    monkeypatch.chdir(tmp_path)
    bystander = tmp_path / "s3:" / "bucket" / "emb" / "chunk.partial"
    bystander.parent.mkdir(parents=True)
    bystander.write_bytes(b"not ours")
    assert remove_leftovers("s3://bucket/emb") == 0
    assert bystander.exists()
