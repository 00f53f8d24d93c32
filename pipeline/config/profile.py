"""A params profile (study.yaml: `base: params.yaml` plus overrides) as a DVC pipeline of its own, so that
DVC, not a second orchestrator, runs it, skips what is done and reruns what a changed key touches.

    python -m pipeline.config.profile study.yaml study     # then: dvc --cd study repro   (make study)

writes <folder>/params.yaml, the profile merged whole (every key DVC tracks, and the selection its matrices
expand; its `base:` is kept only so that relative paths resolve against the project), and <folder>/dvc.yaml:
the project's dvc.yaml with every stage run in the project root on that file and writing under the
profile's paths.store, plus the study's own stages (the selection audit per corpus, the study report).
Both files are derived: edit the profile or dvc.yaml and run it again. They are committed (DVC refuses a
git-ignored dvc.yaml), and a test checks that they are current.

<folder> is a DVC project of its own (a subrepo: <folder>/.dvc), so the project's own DVC never reads the
study's pipeline or its lock: every DVC command parses every pipeline and lock its project holds, and with
the study's in view each command of the default pipeline paid seconds for it (docs/benchmarks.md).
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.params import load_params, merged_params
from pipeline.config.stage_deps import code_deps, stage_module
from pipeline.core.atomic import write_text_atomic
from pipeline.core.errors import ConfigError

HEADER = ("# Written by `python -m pipeline.config.profile {profile} {folder}` from {profile} and dvc.yaml: "
          "do not edit.\n")
STUDY_STAGES = {
    "audit": {
        "matrix": {"dataset": "${select.datasets}"},
        "cmd": "python -m stages.audit --dataset ${item.dataset}",
        "deps": ["store/embeddings/${item.dataset}", "store/scores/${item.dataset}"],
        "params": ["score", "fuse", "select.models"],
        "outs": ["store/audit/${item.dataset}"],
    },
    "study_report": {          # other runs' stores it compares with are read where they exist, not tracked
        "cmd": "python -m stages.study_report",
        "deps": ["store/scores", "store/fusion", "store/compare", "store/audit"],
        "params": ["select", "report"],
        "outs": [{"${report.out}/study.md": {"cache": False}}, {"${report.out}/study_figures": {"cache": False}}],
        "metrics": [{"${report.out}/study.json": {"cache": False}}],
    },
}


def _moved(path: Any, store: str) -> Any:
    """A dep or out of dvc.yaml, moved from store/ to the profile's store."""
    if isinstance(path, dict):
        return {_moved(key, store): value for key, value in path.items()}
    return store + path[len("store"):] if path == "store" or path.startswith("store/") else path


def _uncached(out: Any) -> dict:
    """An out that DVC tracks but does not copy into its cache: a study runs on one machine, its stores are
    not pushed, and a full-size study's stores would otherwise sit on disk twice (a plain `dvc pull` of the
    project then has nothing of the study's to fetch)."""
    path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
    return {path: {**(options or {}), "cache": False}}


def profile_pipeline(profile: Path, folder: Path) -> tuple[str, str]:
    """The texts of the profile's merged params.yaml and of its dvc.yaml, for <folder>."""
    params = load_params(profile)                       # every problem named before anything is derived
    raw, root = merged_params(profile)
    folder = folder.resolve()
    if folder == root or root not in folder.parents:
        raise ConfigError(f"{folder}: a profile's pipeline needs a folder of its own inside the project ({root})")
    merged_file = os.path.relpath(folder / "params.yaml", root)
    header = HEADER.format(profile=os.path.relpath(profile.resolve(), root), folder=os.path.relpath(folder, root))
    merged = header + yaml.safe_dump({"base": os.path.relpath(root / "params.yaml", folder), **raw}, sort_keys=False)
    store = os.path.relpath(params.store, root)
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, stage in STUDY_STAGES.items():
        stages[name] = dict(stage, deps=stage["deps"] + code_deps(stage_module(stage["cmd"]), root))
    for name, stage in stages.items():
        stage.update(wdir=os.path.relpath(root, folder), cmd=f"{stage['cmd']} --params {merged_file}",
                     params=[{merged_file: stage["params"]}])
        for key in ("deps", "outs", "plots", "metrics"):
            if key in stage:
                stage[key] = [_moved(path, store) for path in stage[key]]
        for key in ("outs", "plots", "metrics"):    # every output kind: a plot's data file is an output too
            if key in stage:
                stage[key] = [_uncached(out) for out in stage[key]]
    return merged, header + yaml.safe_dump({"vars": ["params.yaml"], "stages": stages}, sort_keys=False)


SUBPROJECT = {                 # what `dvc init --subdir` writes, with the project's core settings
    ".dvc/config": "[core]\n    autostage = true\n    analytics = false\n",
    ".dvc/.gitignore": "/config.local\n/tmp\n/cache\n",
}


def make_subproject(folder: Path) -> None:
    """Make <folder> a DVC project inside the project's git repository; a file already there is kept."""
    for name, text in SUBPROJECT.items():
        if not (folder / name).exists():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / name, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path, help="a params profile, e.g. study.yaml")
    parser.add_argument("folder", type=Path, help="where its params.yaml and dvc.yaml go, e.g. study")
    args = parser.parse_args()
    try:
        merged, pipeline = profile_pipeline(args.profile, args.folder)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    args.folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.folder / "params.yaml", merged)
    target = args.folder / "dvc.yaml"
    write_text_atomic(target, pipeline)
    make_subproject(args.folder)
    print(f"wrote {args.folder / 'params.yaml'} and {target}; run `dvc --cd {args.folder} repro`")


if __name__ == "__main__":
    main()
