"""The real `dvc repro` in a temporary git clone of the project on a tiny selection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


PROFILE_PIPELINES = ("study", "study_capped")   # the project's other pipelines: not the tiny project's


def clone_project(tmp_path: Path, mirror: Path, select: dict, stages: list[str] | None = None) -> Path:
    """A fresh git clone of the working tree's tracked files, with a tiny selection in params.yaml."""
    repo = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    files = [name for name in files if name.split("/")[0] not in PROFILE_PIPELINES]
    for name in files + ["dvc.yaml", "params.yaml"]:
        source = REPO / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    for extra in ("pipeline", "stages"):   # untracked new modules of the working tree too
        shutil.copytree(REPO / extra, repo / extra, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["paths"]["data_mirror"] = str(mirror)
    raw["select"] = select
    raw["extract"].update(block_rows=64, max_len=32)
    raw["datasets"]["mrslice"] = {"text_column": "text", "label_column": "label",
                                  "local": {"train": "mrslice/train.jsonl", "test": "mrslice/test.jsonl"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if stages is not None:
        dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
        dvc["stages"] = {k: v for k, v in dvc["stages"].items() if k in stages}
        (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], repo)
    return repo


@pytest.mark.slow
def test_dvc_repro_builds_the_stores_then_does_nothing(tmp_path, mr_slice):
    repo = clone_project(tmp_path, mr_slice, {"models": ["minilm-l6"], "datasets": ["mrslice"]},
                         stages=["prepare_model", "prepare_data", "extract"])
    first = run(["dvc", "repro"], repo)
    assert "Running stage 'extract@minilm-l6-mrslice'" in first
    inspect = run([sys.executable, "-m", "pipeline", "inspect"], repo)
    assert "complete" in inspect and "incomplete" not in inspect
    second = run(["dvc", "repro"], repo)
    assert "Running stage" not in second, second
    assert (repo / "dvc.lock").is_file()
