"""dvc.yaml's code deps cannot drift: each stage lists exactly the modules of pipeline/ and stages/ its
command imports (transitively, at module level or inside functions), so `dvc repro` reruns a stage
whenever code it runs changes, and never for code it does not run."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import REPO
from pipeline.config.stage_deps import PACKAGES, code_deps, stage_module


def needed(stage: dict) -> set[Path]:
    return {Path(p) for p in code_deps(stage_module(stage["cmd"]))}


def stage_code_deps(stage: dict) -> set[Path]:
    """Every dep under pipeline/ or stages/ (a folder of code there would be named as never imported)."""
    return {Path(d) for d in stage["deps"] if d.endswith(".py") or d.split("/")[0] in PACKAGES}


def test_every_stage_lists_exactly_the_code_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        wanted, listed = needed(stage), stage_code_deps(stage)
        problems += [f"{name}: imports {p} but dvc.yaml does not list it" for p in sorted(wanted - listed)]
        problems += [f"{name}: lists {p} but never imports it" for p in sorted(listed - wanted)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_removed_line(tmp_path):
    """Drop one dep from a copy of dvc.yaml: the same comparison must name it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stage = stages["score"]
    removed = next(d for d in stage["deps"] if d.endswith("selection.py"))
    stage["deps"].remove(removed)
    missing = needed(stage) - stage_code_deps(stage)
    assert missing == {Path(removed)}


def test_a_corpus_added_to_the_selection_reruns_only_its_own_stages():
    """A per-corpus stage never reads the whole selection: a study adds corpora one by one, and a stage keyed on
    `select` (cost once was) reruns for every corpus already done, each time one is added."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    per_corpus = {name: stage for name, stage in stages.items() if "dataset" in (stage.get("matrix") or {})}
    assert {"prepare_data", "extract", "score", "fuse", "train", "compare", "cost"} <= set(per_corpus)
    reads_selection = {name: stage["params"] for name, stage in per_corpus.items()
                       if {"select", "select.datasets"} & set(stage.get("params", []))}
    assert reads_selection == {}
