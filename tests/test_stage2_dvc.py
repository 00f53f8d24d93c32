"""The real DVC graph of Stage 2 in a temporary git clone: `dvc repro`, then `dvc exp run -S` on one head
type's options reruns only that head's train stage, compare and the report (and cost only when the head chosen on
validation changed). The report opens with the recommendation, whose cost the
cost stage measured, and `predict` prints the same one-line summary."""

from __future__ import annotations

import json

import pytest
import yaml

from test_dvc_stage1 import clone_project, run


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_dvc_repro_then_one_head_types_params_rerun_only_that_head_compare_and_report(tmp_path, mr_slice):
    repo = clone_project(tmp_path, mr_slice, {"models": ["minilm-l6"], "datasets": ["mrslice"]})
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["score"].update(rank=32, pca_rows=200, bootstrap=50)
    raw["fuse"].update(top_k=3)
    raw["train"].update(seeds=[0], max_epochs=2, batch_size=64)
    raw["cost"].update(texts=16, repeats=1, depths=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], repo)

    first = run(["dvc", "repro"], repo)
    heads = raw["train"]["heads"]
    for stage in ("score@minilm-l6-mrslice", "fuse@mrslice", *(f"train@mrslice-{h}" for h in heads), "compare@mrslice",
                  "cost@mrslice", "report"):
        assert f"Running stage '{stage}'" in first, first
    cost = json.loads((repo / "store" / "cost" / "mrslice" / "cost.json").read_text())
    curve = cost["curves"]["minilm-l6"]
    assert curve["depths"] == [0, 6] and all(s > 0 for s in curve["seconds_per_1000"])
    chosen_fusion = json.loads((repo / "store" / "fusion" / "mrslice" / "chosen.json").read_text())["chosen"]
    assert cost["check"]["candidate"] == chosen_fusion["candidate"] and cost["texts"] == 16
    assert cost["check"]["measured_seconds_per_1000"] > 0 and cost["check"]["estimated_seconds_per_1000"] > 0
    report = (repo / "reports" / "report.md").read_text()
    opening = report.split("\n## mrslice")[0]
    from pipeline.report.recommendation import head_seconds
    from pipeline.core.records import CostResult, HeadResults, chosen_on_validation
    chosen = chosen_on_validation(HeadResults.from_json(
        json.loads((repo / "store" / "compare" / "mrslice" / "results.json").read_text())).results)
    seconds, how = head_seconds(chosen, CostResult.from_json(cost))
    assert f"**Use {chosen.row} with the `{chosen.head}` head**" in opening
    assert f"**{seconds:.2f} s per 1,000 texts**, {how}, through" in opening
    assert f"**{cost['cheapest']['candidate']}**" in opening and "figures/mrslice_cost_front.png" in opening
    printed = run(["python", "-m", "pipeline", "predict", "a fine film"], repo)
    assert f"store/heads/mrslice/{chosen.folder}/seed" in printed and f"({chosen.row}, {chosen.head}, seed" in printed
    summary = next(l for l in printed.splitlines() if l.startswith("mrslice: "))
    assert f"`predict` prints: `{summary}`" in opening
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["mrslice"]["models"]["minilm-l6"]["best_layer"] in range(7)
    assert (repo / "reports" / "report.md").read_text().count("| minilm-l6: last layer |") == 2
    assert "mrslice" in run(["dvc", "metrics", "show"], repo)
    assert not (repo / "lightning_logs").exists()
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], repo)

    # one head type's options: its train stage alone retrains, then compare and the report; no timing reruns,
    # whichever head is chosen now (the cost stage prices heads from curves that do not depend on them; issue 23)
    others = {h: _files(repo / "store" / "heads" / "mrslice" / h) for h in heads if h != "mlp"}
    second = run(["dvc", "exp", "run", "-S", "train.mlp.widths=[16]"], repo)
    ran = {line.split("'")[1] for line in second.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@mrslice-mlp", "compare@mrslice", "report"}, second
    assert others == {h: _files(repo / "store" / "heads" / "mrslice" / h) for h in others}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train@mrslice-mlp"]["params"]["params.yaml"]["train.mlp"]["widths"] == [16]
    assert "train.mlp" not in json.dumps(lock["stages"]["train@mrslice-linear"]["params"])
    compared = json.loads((repo / "store" / "compare" / "mrslice" / "results.json").read_text())
    assert {r["head"] for r in compared["results"]} == set(heads)

    # SIGTERM to the train stage under dvc repro (a scheduler preempting the job): dvc fails naming the exit
    # status 143, and dvc.lock keeps the last finished run (issue 22, item 6)
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    from test_staged_outputs import _catches
    raw["train"].update(max_epochs=3000, patience=3000)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    lock_before = (repo / "dvc.lock").read_bytes()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)

    def train_stage() -> int | None:
        """The train stage's Python process once its SIGTERM handler is set (not a shell that runs it)."""
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and b"stages.train" in (entry / "cmdline").read_bytes() and \
                        (entry / "cwd").resolve() == repo.resolve() and _catches(int(entry.name), signal.SIGTERM):
                    return int(entry.name)
            except OSError:
                continue
        return None

    deadline, pid = time.time() + 300, None
    while time.time() < deadline and dvc.poll() is None and pid is None:
        pid = train_stage()
        time.sleep(0.01)
    assert pid and dvc.poll() is None, "the train stage never started under dvc repro"
    os.kill(pid, signal.SIGTERM)
    output, _ = dvc.communicate(timeout=300)
    assert dvc.returncode != 0 and "stopped by SIGTERM" in output and "143" in output, output
    assert (repo / "dvc.lock").read_bytes() == lock_before
