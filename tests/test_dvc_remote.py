"""Embeddings shared through a DVC remote: extract once, `dvc push`; a fresh clone pulls the stores and
`dvc repro` runs no stage at all (so no model is loaded and nothing is extracted again)."""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import tiny_llama_entry
from test_dvc_stage1 import clone_project, run

STAGES = ["prepare_model", "prepare_data", "extract"]


@pytest.mark.slow
def test_push_then_fresh_clone_pull_and_repro_reruns_nothing(tmp_path, mr_slice, prepared_models):
    origin = clone_project(tmp_path / "origin", mr_slice, {"models": ["tiny-llama"], "datasets": ["mrslice"]},
                           stages=STAGES)
    raw = yaml.safe_load((origin / "params.yaml").read_text())
    raw["models"].update(tiny_llama_entry(prepared_models))
    (origin / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], origin)   # users: s3://bucket/dvc (see docs/scaling.md)
    first = run(["dvc", "repro"], origin)
    assert "Running stage 'extract@tiny-llama-mrslice'" in first
    run(["dvc", "push"], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "extracted"], origin)
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"

    for name, commands in {"pull": [["dvc", "pull"], ["dvc", "repro"]],
                           "repro-pull": [["dvc", "repro", "--pull"]]}.items():
        clone = tmp_path / name
        run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
        assert not (clone / "store" / "embeddings").exists()
        outputs = [run(command, clone) for command in commands]
        assert all("Running stage" not in out for out in outputs), outputs    # nothing ran: no model loaded
        store = clone / "store" / "embeddings" / "mrslice" / "tiny-llama"
        inspect = run([sys.executable, "-m", "pipeline", "inspect", str(store)], clone)
        assert "complete" in inspect and "incomplete" not in inspect, inspect
        from pipeline.store.reader import EmbeddingStore
        opened = EmbeddingStore(store)
        assert len(opened.attrs["runs"]) == 1, "the pulled store holds the origin's run only"
        assert opened.layer("test", "mean", -1).shape == (80, 48)
        status = run(["dvc", "status"], clone)
        assert "up to date" in status, status
