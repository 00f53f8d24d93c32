"""Stage 2 writes each stage's outputs as one unit (pipeline.core.atomic.staged_folder): a killed stage leaves
the old set of files or the new set, never a mix (issue 11, item 6). SIGKILL at many moments, on a
writer of versioned files and on the real train stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from _stage2_store import make_store
from conftest import REPO, registry, wait_until
from pipeline.core import atomic
from pipeline.core.atomic import clean_leftovers, staged_folder, write_text_atomic


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _heads_written_since(folder: Path, started_ns: int) -> int:
    """config.json files under folder modified since started_ns, read while a stage renames its staged
    folder into place: a folder or file that vanishes between listing and stat counts as not seen yet."""
    count = 0
    for parent, _, names in os.walk(folder):        # os.walk skips a folder that vanishes while it lists
        if "config.json" in names:
            try:
                count += os.stat(os.path.join(parent, "config.json")).st_mtime_ns >= started_ns
            except FileNotFoundError:
                pass
    return count


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


# -- the context manager --------------------------------------------------------------------------------
def test_the_new_set_replaces_the_old_set_whole_and_a_failed_block_changes_nothing(tmp_path):
    out = tmp_path / "fusion" / "toy"
    for name in ("leaderboard.csv", "chosen.json", "stale.json"):
        write_text_atomic(out / name, "old")
    with staged_folder(out) as staged:
        assert staged.parent == out.parent and staged.name.startswith(".toy.staged-") and not any(staged.iterdir())
        write_text_atomic(staged / "leaderboard.csv", "new")
        write_text_atomic(staged / "chosen.json", "new")
        assert _files(out) == {"leaderboard.csv": b"old", "chosen.json": b"old", "stale.json": b"old"}
    assert _files(out) == {"leaderboard.csv": b"new", "chosen.json": b"new"}      # the stale file went too
    with pytest.raises(RuntimeError, match="killed half way"):
        with staged_folder(out) as staged:
            write_text_atomic(staged / "chosen.json", "newer")
            raise RuntimeError("killed half way")
    assert _files(out) == {"leaderboard.csv": b"new", "chosen.json": b"new"}
    assert _siblings(out) == ["toy"]                                              # nothing left beside it


def test_keep_others_swaps_only_what_the_block_wrote(tmp_path):
    """reports/: report.md, figures/ and metrics.json are one unit; benchmarks.md (another producer's) stays."""
    out = tmp_path / "reports"
    write_text_atomic(out / "benchmarks.md", "bench")
    write_text_atomic(out / "report.md", "old report")
    write_text_atomic(out / "figures" / "gone.png", "old figure")
    write_text_atomic(out / "notes" / "a.txt", "kept tree")
    inode = (out / "benchmarks.md").stat().st_ino
    with staged_folder(out, keep_others=True) as staged:
        write_text_atomic(staged / "report.md", "new report")
        write_text_atomic(staged / "figures" / "new.png", "new figure")
        write_text_atomic(staged / "metrics.json", "{}")
    assert _files(out) == {"benchmarks.md": b"bench", "figures/new.png": b"new figure", "metrics.json": b"{}",
                           "notes/a.txt": b"kept tree", "report.md": b"new report"}
    assert (out / "benchmarks.md").stat().st_ino == inode                         # the same file, not a copy


def test_a_staged_output_never_replaces_a_file(tmp_path):
    """`--out params.yaml` once turned params.yaml into a folder of report files (issue 22, item 7)."""
    from pipeline.core.errors import OutputError
    out = tmp_path / "params.yaml"
    out.write_text("keep me")
    with pytest.raises(OutputError, match="params.yaml is a file, not a folder"):
        with staged_folder(out, keep_others=True) as staged:
            (staged / "report.md").write_text("new")
    assert out.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_leftovers_of_killed_runs_are_removed_and_an_old_set_moved_aside_comes_back(tmp_path):
    out, dead = tmp_path / "heads" / "toy", _dead_pid()
    write_text_atomic(out.parent / f".toy.staged-{dead}-x1" / "seed0" / "config.json", "partial new")
    write_text_atomic(out.parent / f".toy.old-{dead}-x2" / "results.json", "old")    # killed between renames
    write_text_atomic(out.parent / f".toy.staged-{os.getpid()}-x3" / "results.json", "a live run's")
    clean_leftovers(out)
    assert _files(out) == {"results.json": b"old"}
    assert _siblings(out) == [f".toy.staged-{os.getpid()}-x3", "toy"]             # a live run is not touched


def test_without_exchange_two_renames_still_give_old_or_new(tmp_path, monkeypatch):
    """Systems without renameat2(RENAME_EXCHANGE): rename the old set aside, the new one in, delete the old."""
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    out = tmp_path / "scores" / "toy" / "m"
    write_text_atomic(out / "scores.json", "old")
    with staged_folder(out) as staged:
        write_text_atomic(staged / "scores.json", "new")
    assert _files(out) == {"scores.json": b"new"} and _siblings(out) == ["m"]


# -- SIGKILL while a process rewrites a set of files again and again --------------------------------------
WRITER = """
import itertools, sys
from pathlib import Path
from pipeline.core.atomic import staged_folder, write_text_atomic
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
for version in itertools.islice(itertools.count(int(sys.argv[3])), rounds):
    with staged_folder(out) as staged:
        for name in ("results.json", "seed0/config.json", "seed1/config.json", "seed2/config.json", "resources.json"):
            write_text_atomic(staged / name, f"{version}\\n" + "x" * 200_000)
"""
NAMES = {"results.json", "seed0/config.json", "seed1/config.json", "seed2/config.json", "resources.json"}


def _first_line(path: Path) -> str | None:
    try:
        return path.read_text().split("\n", 1)[0]
    except FileNotFoundError:
        return None


def _versions_through(folder_fd: int) -> set[str]:
    """Read the set through an open handle on the folder, as a reader that resolves the path once."""
    versions = set()
    for name in NAMES:
        with open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=folder_fd)) as handle:
            versions.add(handle.readline().decode())
    return versions


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_the_old_set_or_the_new_set(tmp_path):
    out = tmp_path / "heads" / "toy"
    rng = np.random.default_rng(11)
    stop, mixes, reads = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
            try:
                versions = _versions_through(fd)
                reads[0] += 1
                if len(versions) > 1:
                    mixes.append(versions)
            except FileNotFoundError:   # the old set was deleted under a slow reader: an error, not a mix
                pass
            finally:
                os.close(fd)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    seen, leftover_kills = set(), 0
    try:
        for kill in range(10):
            process = subprocess.Popen([sys.executable, "-c", WRITER, str(out), "1000000", str(kill * 1000)], cwd=REPO)
            wait_until(lambda: int(_first_line(out / "results.json") or -1) >= kill * 1000, process,
                       f"run {kill} wrote its first set")            # then a moment among its later writes
            time.sleep(float(rng.uniform(0.0, 0.5)))
            process.send_signal(signal.SIGKILL)
            process.wait()
            leftover_kills += out.parent.exists() and len(_siblings(out)) > 1
            if out.exists():
                assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == NAMES
                versions = {_first_line(out / name) for name in NAMES}
                assert len(versions) == 1, f"kill {kill} left a mix of versions {versions}"
                seen |= versions
    finally:
        stop.set()
        thread.join()
    assert not mixes, mixes
    assert len(seen) >= 3 and reads[0] > 0, (seen, reads)
    assert leftover_kills, "no kill left a leftover: the moments missed the writes"
    subprocess.run([sys.executable, "-c", WRITER, str(out), "1", "99999"], cwd=REPO, check=True)
    assert _siblings(out) == ["toy"]                     # the next run removed every leftover
    assert (out / "results.json").read_text().startswith("99999\n")


# -- the real train stage, killed half way ------------------------------------------------------------------
def toy_project(folder: Path) -> Path:
    """params.yaml for Stage 2 on one synthetic store (tests/_stage2_store.py), with tiny settings."""
    make_store(folder / "store", "toy-a", best_layer=3)
    raw = registry()
    raw["paths"] = {"store": str(folder / "store")}
    raw["select"] = {"models": ["toy-a"], "datasets": ["toy"]}
    raw["models"]["toy-a"] = {"source": "local", "path": str(folder / "unused")}
    raw["datasets"]["toy"] = {"text_column": "text", "label_column": "label", "local": {"train": "toy/train.jsonl"}}
    raw["score"].update(rank=8, pca_rows=200, bootstrap=20)
    raw["fuse"].update(top_k=3, last_n=2)
    raw["train"].update(heads=["linear"], seeds=[0, 1, 2], max_epochs=3, batch_size=64, device="cpu", threads=1)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stage(params: Path, name: str, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"stages.{name}", "--params", str(params), *arguments], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_stage(params: Path, name: str, *arguments: str) -> str:
    output, _ = (process := stage(params, name, *arguments)).communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def trained_toy_project(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """The toy project after score, fuse, train (linear) and compare: its params, the linear heads' folder and
    that folder's files."""
    params = toy_project(tmp_path)
    run_stage(params, "score", "--model", "toy-a", "--dataset", "toy")
    run_stage(params, "fuse", "--dataset", "toy")
    run_stage(params, "train", "--dataset", "toy", "--head", "linear")
    run_stage(params, "compare", "--dataset", "toy")
    out = tmp_path / "store" / "heads" / "toy" / "linear"
    return params, out, _files(out)


@pytest.mark.slow
def test_a_train_stage_killed_half_way_leaves_the_old_heads_whole(tmp_path):
    params, out, old = trained_toy_project(tmp_path)
    heads = sum(k.endswith("config.json") for k in old)
    assert heads >= 6 and "results.json" in old
    for written in (1, heads // 2, heads):                 # kill after this many heads of the new run exist
        started = time.time_ns()
        process = stage(params, "train", "--dataset", "toy", "--head", "linear")
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if _heads_written_since(out.parent, started) >= written:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        output, _ = process.communicate()
        assert process.returncode == -signal.SIGKILL, output
        now = _files(out)
        assert now.keys() == old.keys()
        if written < heads:
            assert now == old, f"killed after {written} heads: the old set changed"
        else:              # the kill may land after the swap: then all new (by mtime: two runs' rounded seconds
            new = [p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime_ns >= started]   # can coincide)
            assert len(new) in (0, len(now)), f"a mix of old and new files: {sorted(map(str, new))}"
    assert len(_siblings(out)) > 1                        # the killed runs' staged folders are still there
    final_run = time.time_ns()
    run_stage(params, "train", "--dataset", "toy", "--head", "linear")
    new = _files(out)
    # every file is the final run's (by mtime: two runs' rounded seconds can coincide byte for byte)
    assert new.keys() == old.keys() and all(p.stat().st_mtime_ns >= final_run for p in out.rglob("*") if p.is_file())
    assert _siblings(out) == ["linear"]
    results = json.loads(new["results.json"])
    assert all(f"{row['folder'].removeprefix('linear/')}/seed{seed}/config.json" in new
               for row in results["results"] for seed in (0, 1, 2))
    run_stage(params, "compare", "--dataset", "toy")

    reports = tmp_path / "reports"                        # the report: its unit swapped, other files kept
    write_text_atomic(reports / "benchmarks.md", "another producer's file")
    write_text_atomic(reports / "figures" / "stale.png", "a figure of a dataset no longer selected")
    run_stage(params, "report", "--out", "reports")
    assert sorted(_files(reports)) == ["benchmarks.md", "figures/toy_layers_all_models.png",
                                       "figures/toy_toy-a_layer_scores.png", "figures/toy_toy-a_layers.png",
                                       "metrics.json", "report.md"]
    assert (reports / "benchmarks.md").read_text() == "another producer's file"
    refused = stage(params, "report", "--out", ".")
    output, _ = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "error: --out .: the report needs a folder of its own" in output, output
    mine = params.parent / "notes.txt"                    # an existing file is never turned into a folder
    mine.write_text("a file of the user's")
    refused = stage(params, "report", "--out", "notes.txt")
    output, _ = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "notes.txt is a file" in output, output
    assert mine.read_text() == "a file of the user's" and not list(params.parent.glob(".notes.txt*"))


# -- SIGTERM and SIGINT: a stopped stage never exits 0 -------------------------------------------------------
SWALLOWER = """
import os, signal, sys, time
from pipeline.core.errors import exit_status_on_signals
with exit_status_on_signals():
    try:
        open(sys.argv[1], "w").close()          # the test's cue: the handlers are set
        time.sleep(60)
    except BaseException:
        sys.exit(0)                             # what Lightning does with SIGTERM inside trainer.fit
print("finished")
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_exits_128_plus_its_number_even_when_the_code_inside_exits_0(tmp_path, signum):
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", SWALLOWER, str(ready)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signum)
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, errors
    assert "finished" not in output and f"stopped by {signal.Signals(signum).name}" in errors


DROPPED = """
import os, signal, time
from pipeline.core.errors import exit_status_on_signals

class SignalsItselfWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):                # the handler runs here, and Python drops what it raises
            pass

with exit_status_on_signals():
    SignalsItselfWhenCollected()
    end = time.time() + 60
    while time.time() < end:
        time.sleep(0.01)
    print("ran to the end")                    # what a run that was never told would say
"""


@pytest.mark.slow
def test_a_signal_whose_exception_python_drops_in_a_finaliser_still_stops_the_run(tmp_path):
    """CI once saw a train stage sent SIGTERM go on fitting: the Terminated was raised inside a weakref
    callback run by the garbage collector, where Python prints "Exception ignored" and drops it. The signal
    is delivered again until it stops the run: exit 143 within seconds, not the 60 s the code would run."""
    process = subprocess.run([sys.executable, "-c", DROPPED], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Exception ignored" in process.stderr, process.stderr      # the case happened: it was dropped once
    assert process.returncode == 128 + signal.SIGTERM, process.stderr
    assert "ran to the end" not in process.stdout and "stopped by SIGTERM" in process.stderr


@pytest.mark.slow
def test_a_train_stage_sent_sigterm_mid_work_exits_143_and_leaves_the_old_heads(tmp_path):
    """Lightning turns SIGTERM into SystemExit(0) (SLURM and Kubernetes preempt with SIGTERM): the stage said
    success having written nothing. Sent once the new run's first head exists, while Lightning fits the next."""
    params, out, old = trained_toy_project(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["train"].update(max_epochs=3000, patience=3000)     # each later fit takes seconds: the signal lands inside one
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.time_ns()
    process = stage(params, "train", "--dataset", "toy", "--head", "linear")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if _heads_written_since(out.parent, started):
            break
        time.sleep(0.01)
    assert process.poll() is None, "the stage finished before the signal: the toy run is too short"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output
    assert _files(out) == old


def _catches(pid: int, signum: int) -> bool:
    """Whether a process has installed its handler for signum (Linux: the SigCgt mask in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.slow
def test_every_stage2_stage_sent_sigterm_exits_143_and_keeps_its_outputs(tmp_path):
    """Issue 22, item 6: each stage, sent SIGTERM as soon as its handlers are set (the moment observed in
    /proc, not after a sleep), exits 143 naming the signal, and its old outputs stay as they were."""
    params, heads, _ = trained_toy_project(tmp_path)
    run_stage(params, "report", "--out", "reports")
    outputs = {"score": (tmp_path / "store" / "scores" / "toy", ("--model", "toy-a", "--dataset", "toy")),
               "fuse": (tmp_path / "store" / "fusion" / "toy", ("--dataset", "toy")),
               "train": (heads, ("--dataset", "toy", "--head", "linear")),
               "compare": (tmp_path / "store" / "compare" / "toy", ("--dataset", "toy")),
               "report": (tmp_path / "reports", ("--out", "reports"))}
    for name, (folder, arguments) in outputs.items():
        before = _files(folder)
        process = stage(params, name, *arguments)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and not _catches(process.pid, signal.SIGTERM):
            time.sleep(0.002)
        assert process.poll() is None, f"{name} ended before the signal"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in output, (name, output)
        assert _files(folder) == before, f"{name}: a stage stopped by SIGTERM changed its outputs"
