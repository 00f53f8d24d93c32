"""The real DVC graph of Stage 2 in a temporary git clone: `dvc repro`, then `dvc exp run -S` on a
head parameter reruns only train and report."""

from __future__ import annotations

import json

import pytest
import yaml

from test_dvc_stage1 import clone_project, run


@pytest.mark.slow
def test_dvc_repro_then_head_param_reruns_only_train_and_report(tmp_path, mr_slice):
    repo = clone_project(tmp_path, mr_slice, {"models": ["minilm-l6"], "datasets": ["mrslice"]})
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["score"].update(rank=32, pca_rows=200, bootstrap=50)
    raw["fuse"].update(top_k=3)
    raw["train"].update(seeds=[0], max_epochs=2, batch_size=64)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], repo)

    first = run(["dvc", "repro"], repo)
    for stage in ("score@minilm-l6-mrslice", "fuse@mrslice", "train@mrslice", "report"):
        assert f"Running stage '{stage}'" in first, first
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["mrslice"]["models"]["minilm-l6"]["best_layer"] in range(7)
    assert (repo / "reports" / "report.md").read_text().count("| minilm-l6: last layer |") == 2
    assert "mrslice" in run(["dvc", "metrics", "show"], repo)
    assert not (repo / "lightning_logs").exists()
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], repo)

    second = run(["dvc", "exp", "run", "-S", "train.max_epochs=3"], repo)
    ran = {line.split("'")[1] for line in second.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@mrslice", "report"}, second
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train@mrslice"]["params"]["params.yaml"]["train"]["max_epochs"] == 3
