"""`make study` is DVC (issue 20, item 3): a params profile becomes a DVC pipeline of its own, in a DVC
project of its own (pipeline/config/profile.py). In a real clone, a tiny profile's pipeline runs every stage
once, a second `dvc repro` runs nothing, a changed key reruns only the stages that read it, and the
project's own DVC never sees the profile's stages."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from conftest import REPO
from pipeline.config.profile import profile_pipeline
from test_dvc_stage1 import clone_project, run

PROFILE = {
    "base": "params.yaml",
    "paths": {"store": "store/tiny"},
    "score": {"rank": 32, "pca_rows": 200, "bootstrap": 20},
    "fuse": {"top_k": 2},
    "train": {"heads": ["linear"], "seeds": [0], "max_epochs": 2, "batch_size": 64},
    "cost": {"texts": 8, "repeats": 1, "depths": 2},
    "report": {"out": "reports/tiny"},
}


def ran(output: str) -> set[str]:
    """The stages dvc ran, without their file's prefix (tiny/dvc.yaml:)."""
    return {line.split("'")[1].split(":")[-1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.mark.slow
def test_a_profile_runs_as_its_own_dvc_pipeline_and_reruns_only_what_a_key_touches(tmp_path, mr_slice):
    repo = clone_project(tmp_path, mr_slice, {"models": ["minilm-l6"], "datasets": ["mrslice"]})
    (repo / "tiny.yaml").write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    run(["python", "-m", "pipeline.config.profile", "tiny.yaml", "tiny"], repo)
    first = run(["dvc", "--cd", "tiny", "repro"], repo)          # what `make study` runs
    assert ran(first) == {"prepare_model@minilm-l6", "prepare_data@mrslice", "extract@minilm-l6-mrslice",
                          "score@minilm-l6-mrslice", "fuse@mrslice", "train@mrslice-linear", "compare@mrslice",
                          "cost@mrslice", "audit@mrslice", "report", "study_report"}, first
    assert (repo / "store" / "tiny" / "audit" / "mrslice" / "audit.json").is_file()
    assert not (repo / "store" / "scores").exists(), "the profile writes under its own store"
    assert (repo / "reports" / "tiny" / "report.md").is_file() and (repo / "reports" / "tiny" / "study.md").is_file()
    lock = yaml.safe_load((repo / "tiny" / "dvc.lock").read_text())
    assert lock["stages"]["train@mrslice-linear"]["params"]["tiny/params.yaml"]["train.seeds"] == [0]

    second = run(["dvc", "--cd", "tiny", "repro"], repo)
    assert not ran(second) and "up to date" in second, second
    # the project's DVC does not see the profile's pipeline (every default command would parse it)
    project = run(["dvc", "stage", "list", "--all", "--name-only"], repo).split()
    assert "prepare_model@minilm-l6" in project and not [s for s in project if "tiny" in s or "audit" in s], project

    PROFILE["train"]["lr"] = 0.01                       # read by training alone: train, compare, reports rerun
    (repo / "tiny.yaml").write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    run(["python", "-m", "pipeline.config.profile", "tiny.yaml", "tiny"], repo)
    third = run(["dvc", "--cd", "tiny", "repro"], repo)
    assert ran(third) == {"train@mrslice-linear", "compare@mrslice", "report", "study_report"}, third
    results = json.loads((repo / "store" / "tiny" / "compare" / "mrslice" / "results.json").read_text())
    assert results["settings"]["lr"] == 0.01


@pytest.mark.parametrize("profile, folder", [("study.yaml", "study"), ("study_capped.yaml", "study_capped")])
def test_the_committed_study_pipelines_are_current_and_dvc_can_read_them(profile, folder):
    """`make study` runs `dvc --cd study repro`, and DVC refuses a dvc.yaml that git ignores (an earlier
    release ignored the folder: `make study` stopped at "bad DVC file name"). The files are committed, so
    they must be what the profile derives now; nor may git ignore the dvc.lock a run writes beside them, or
    the DVC project's config that keeps the study out of the default pipeline's DVC."""
    merged, pipeline = profile_pipeline(REPO / profile, REPO / folder)
    regenerate = f"run `python -m pipeline.config.profile {profile} {folder}`"
    assert (REPO / folder / "params.yaml").read_text() == merged, regenerate
    assert (REPO / folder / "dvc.yaml").read_text() == pipeline, regenerate
    assert (REPO / folder / ".dvc" / "config").is_file(), regenerate
    for name in ("params.yaml", "dvc.yaml", "dvc.lock", ".dvc/config"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/{name}"], cwd=REPO)
        assert ignored.returncode == 1, f"{folder}/{name} is git-ignored: DVC will not run {folder}/dvc.yaml"


@pytest.mark.parametrize(("profile", "folder"), [("study.yaml", "study"), ("study_capped.yaml", "study_capped")])
def test_no_output_of_a_study_pipeline_goes_into_dvcs_cache(profile, folder):
    """A study's outputs stay on its machine (docs/study.md): outs, plots and metrics alike. A plot's data file
    left cached made a copy of the study without that cache rerun every score stage ("not in cache")."""
    stages = yaml.safe_load(profile_pipeline(REPO / profile, REPO / folder)[1])["stages"]
    outputs = [(name, out) for name, stage in stages.items() for key in ("outs", "plots", "metrics")
               for out in stage.get(key, [])]
    assert any(isinstance(out, dict) and "layers.csv" in next(iter(out)) for _, out in outputs)   # the plots are seen
    cached = [(name, out) for name, out in outputs if not isinstance(out, dict) or next(iter(out.values())).get("cache") is not False]
    assert cached == [], f"cached outputs in {folder}/dvc.yaml: {cached}"
