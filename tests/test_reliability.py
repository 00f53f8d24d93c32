"""What survives what: SIGKILL anywhere, two writers, readers during writes, a full disk, flipped
bytes, settings drift, killed result writers, and the security audit (docs/reliability.md).

Extraction children come from a forkserver with torch and transformers preloaded (tests/_workers.py),
so killing ten of them costs seconds. Every interrupted store is compared bit for bit with one
uninterrupted reference extraction of the same settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

import _workers
from conftest import REPO, link_prepared, make_tiny_llama, registry, tiny_llama_entry, wait_until
from pipeline.config.sections import ModelSpec
from pipeline.config.params import load_params
from pipeline.sources.corpora import build_corpus, write_corpus
from pipeline.core.errors import ConfigError, StoreIncompleteError, StoreMismatchError
from pipeline.extract.driver import extract
from pipeline.core.lock import StoreLockedError, lock_path, read_holder, run_lock
from pipeline.store.reader import EmbeddingStore
from pipeline.store.format import block_digest
from pipeline.store.verify import StoreSpaceError, verify_store

MODEL, DATASET = "tiny-llama", "mrslice"
SETTINGS = {"block_rows": 5, "token_budget": 256, "max_len": 64, "compute_dtype": "float32"}   # 65 blocks
SPLITS = ("train", "validation", "test")


# -- fixtures and helpers ---------------------------------------------------------------------------
def write_params(folder: Path, mirror: Path, prepared: Path, extract: dict | None = None) -> Path:
    raw = registry()
    raw["paths"] = {"store": str(folder / "store"), "data_mirror": str(mirror)}
    raw["select"] = {"models": [MODEL], "datasets": [DATASET]}
    raw["extract"].update({**SETTINGS, **(extract or {})})
    raw["models"].update(tiny_llama_entry(prepared))
    raw["datasets"][DATASET] = {"text_column": "text", "label_column": "label",
                                "local": {"train": "mrslice/train.jsonl", "test": "mrslice/test.jsonl"}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mr_slice, prepared_models):
    """One uninterrupted extraction: what every interrupted one must end up equal to, bit for bit."""
    params = load_params(write_params(tmp_path_factory.mktemp("reference"), mr_slice, prepared_models))
    write_corpus(build_corpus(params.dataset(DATASET), params.data_mirror, params.data), params.data_dir(DATASET))
    link_prepared(prepared_models, params.store, [MODEL])
    extract(params, MODEL, DATASET, show_progress=False)
    return params


@pytest.fixture
def project(tmp_path, reference, mr_slice, prepared_models):
    """A fresh project with the reference's settings, corpus and model, and no store yet."""

    def make(name: str = "p", extract: dict | None = None, mirror: Path | None = None):
        folder = tmp_path / name
        params_path = write_params(folder, mirror or mr_slice, prepared_models, extract)
        if mirror is None:
            shutil.copytree(reference.data_dir(DATASET), folder / "store" / "data" / DATASET)
        link_prepared(reference.store, folder / "store", [MODEL])
        return params_path, load_params(params_path)

    return make


def store_path(params) -> Path:
    return Path(params.embeddings_path(MODEL, DATASET))


def arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {f"{split}/{name}": array[:] for split in SPLITS for name, array in root[split].arrays()}


def assert_same_as_reference(path: Path, reference) -> None:
    ours, theirs = arrays(path), arrays(store_path(reference))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def total_blocks(reference) -> int:
    store = EmbeddingStore(store_path(reference))
    return sum(store.completion(split)[1] for split in store.splits)


def count_done(path: Path) -> int:
    """Done marks on disk (each is one chunk file); safe to call while a writer runs."""
    count = 0
    for folder in path.glob("*/_done/c"):
        try:
            count += sum(1 for f in folder.iterdir() if "." not in f.name)
        except FileNotFoundError:
            pass
    return count


def done_block_files(path: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file of every finished block. Zarr writes by rename, so a block that
    is written again gets new inodes: comparing these proves a finished block was never recomputed."""
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = root.attrs.asdict()
    except Exception:
        return {}
    out = {}
    for split in attrs.get("splits", {}):
        for block in np.flatnonzero(root[split]["_done"][:]):
            files = [path / split / p / "c" / str(block) / "0" / "0" for p in attrs["poolings"]]
            files += [path / split / "_digest" / "c" / str(block) / "0", path / split / "_done" / "c" / str(block)]
            for file in files:
                stat = file.stat()
                out[str(file.relative_to(path))] = (stat.st_ino, stat.st_mtime_ns)
    return out


def check_readers(path: Path, reference) -> str:
    """A reader sees only finished blocks: a split is refused while incomplete, and with
    allow_incomplete every block marked done equals the reference's."""
    try:
        store = EmbeddingStore(path)
    except FileNotFoundError:
        return "no store yet"
    ref = EmbeddingStore(store_path(reference))
    block_rows = int(store.attrs["block_rows"])
    partial = EmbeddingStore(path, allow_incomplete=True)
    for split in store.splits:
        done = store.root[split]["_done"][:].astype(bool)
        if not done.all():
            with pytest.raises(StoreIncompleteError, match="incomplete"):
                store.layer(split, "mean", 0)
        for block in np.flatnonzero(done):
            rows = slice(int(block) * block_rows, (int(block) + 1) * block_rows)
            for pooling in store.poolings:
                np.testing.assert_array_equal(partial.layers(split, pooling, rows=rows),
                                              ref.layers(split, pooling, rows=rows), err_msg=f"{split}/{pooling}")
    return f"{len(store.splits)} split(s)"


def start_child(ctx, params_path: Path, result: Path, **kwargs):
    process = ctx.Process(target=_workers.extract_child, args=(str(params_path), MODEL, DATASET, str(result)),
                          kwargs=kwargs)
    process.start()
    return process


def wait_for(condition, process, timeout: float = 90.0) -> bool:
    """Poll until `condition()` or the process ended; True when the condition was met."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not process.is_alive():
            return False
        time.sleep(0.002)
    raise TimeoutError("extraction child made no progress")


# -- kill anywhere ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_10_random_moments_resumes_bit_identical(project, reference):
    """Ten SIGKILLs at seeded random moments (start-up, store creation, between and inside block
    writes), resuming each time: readers only ever see finished blocks, no finished block is
    written twice, and the end result equals an uninterrupted run bit for bit."""
    params_path, params = project()
    path = store_path(params)
    total = total_blocks(reference)
    ctx = _workers.context()
    rng = np.random.default_rng(1234)
    moments = ["creation", "startup", "creation", "blocks", "startup", "blocks", "blocks", "creation", "blocks",
               "blocks"]
    protected: dict[str, tuple[int, int]] = {}
    log, killed = [], set()
    for round_, moment in enumerate(moments):
        before = count_done(path)
        process = start_child(ctx, params_path, path.parent / f"result-{round_}.json")
        if moment == "startup":
            delay = float(rng.uniform(0.0, 1.5))
            deadline = time.monotonic() + delay
            wait_for(lambda: time.monotonic() > deadline, process)
        elif moment == "creation":      # the first time: while the store and its splits' arrays are created
            wait_for(lambda: (path / "zarr.json").exists(), process)
            time.sleep(float(rng.uniform(0.0, 0.03)))
        else:
            target = before + int(rng.integers(1, 4))
            wait_for(lambda: count_done(path) >= target, process)
            time.sleep(float(rng.uniform(0.0, 0.02)))
        assert process.is_alive(), f"round {round_}: the extraction finished before the kill; use more blocks"
        process.kill()
        process.join()
        assert process.exitcode == -signal.SIGKILL
        after = count_done(path)
        splits = len(EmbeddingStore(path, allow_incomplete=True).splits) if (path / "zarr.json").exists() else 0
        log.append((round_, moment, before, after, f"{splits}/3 splits"))
        check_readers(path, reference)
        assert not [p for p in verify_store(path) if p.serious], f"round {round_}: {verify_store(path)}"
        now = done_block_files(path)
        rewritten = [f for f, stamp in protected.items() if now.get(f) != stamp]
        assert not rewritten, f"round {round_}: finished blocks were written again: {rewritten[:5]}"
        protected.update(now)
        killed.add(process.pid)      # a killed holder's lock file stays behind, naming a dead pid: harmless
        assert read_holder(path).get("pid", process.pid) in killed
    done_before = count_done(path)
    assert 0 < done_before < total
    summary = extract(load_params(params_path), MODEL, DATASET, show_progress=False)   # resumes past the stale lock
    assert summary["blocks"] == total - done_before, "a finished block was computed again"
    now = done_block_files(path)
    assert all(now[f] == stamp for f, stamp in protected.items()), "a finished block was written again"
    assert_same_as_reference(path, reference)
    assert verify_store(path) == []
    print(f"\nkills survived: {len(log)}; (round, moment, blocks done before, at kill, splits created): {log}; "
          f"blocks kept across kills: {done_before}/{total}; rows lost: 0")


def test_a_store_whose_creation_was_killed_is_created_again(project, reference):
    """A kill between creating the root zarr.json and writing our attributes leaves a bare Zarr
    group (and maybe Zarr's *.partial temporary files): the next run starts over instead of refusing."""
    params_path, params = project()
    path = store_path(params)
    zarr.open_group(str(path), mode="w")
    (path / "zarr.0123abcd.partial").write_bytes(b"{half")
    assert extract(params, MODEL, DATASET, show_progress=False)["blocks"] == total_blocks(reference)
    assert_same_as_reference(path, reference)


# -- two writers ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder_or_waits(project, reference, tmp_path):
    params_path, params = project()
    path = store_path(params)
    with run_lock(path) as holder:
        assert read_holder(path)["pid"] == os.getpid() == holder["pid"]
        with pytest.raises(StoreLockedError, match=rf"being written by pid {os.getpid()} on host .*--wait"):
            extract(params, MODEL, DATASET, show_progress=False)
        assert not path.exists(), "the refused writer must stop before any work"
    # a lock file left by a dead holder (SIGKILL) does not block anyone: the kernel freed its flock
    lock_path(path).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "started": "yesterday"}))
    # two writers started together, both with --wait: one extracts everything, the other queues behind
    # it and finds nothing left to do; no row is written twice or lost
    ctx = _workers.context()
    children = [start_child(ctx, params_path, tmp_path / f"writer-{i}.json", wait=True) for i in range(2)]
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    results = [json.loads((tmp_path / f"writer-{i}.json").read_text()) for i in range(2)]
    assert all(r["ok"] for r in results), results
    assert sorted(r["summary"]["blocks"] for r in results) == [0, total_blocks(reference)]
    assert len(EmbeddingStore(path).attrs["runs"]) == 1
    assert_same_as_reference(path, reference)
    assert not lock_path(path).exists(), "a finished run removes its lock file"


# -- disk full --------------------------------------------------------------------------------------
def _mount_allowed() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"layerfuse-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                          capture_output=True).returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["tmpfs", "fsize"])
def test_full_disk_fails_clearly_then_a_rerun_completes(limit, project, reference, tmp_path):
    """A filesystem that fills up (a 300 KiB tmpfs) or a file-size limit (RLIMIT_FSIZE, EFBIG) stops
    the run with a message saying where and how much; after space is freed, a rerun resumes."""
    params_path, params = project()
    path = store_path(params)
    if limit == "tmpfs":
        if not _mount_allowed():
            pytest.skip("mounting a tmpfs needs root; the fsize variant covers the same path")
        mount_point = params.store / "embeddings"
        mount_point.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount_point)], check=True)
        try:
            with pytest.raises(StoreSpaceError) as error:
                extract(params, MODEL, DATASET, show_progress=False)
            message = str(error.value)
            assert "no space left on the filesystem holding" in message and str(path) in message
            assert re.search(r"needs about [\d.,]+ [KMG]iB more \(\d+ blocks", message), message
            assert "rerun" in message
            done = count_done(path)
            assert done > 0 and f"{done} finished blocks are kept" in message, message
            assert not [p for p in verify_store(path) if p.serious]
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)   # space freed
            summary = extract(params, MODEL, DATASET, show_progress=False)
            assert summary["blocks"] == total_blocks(reference) - done
            assert_same_as_reference(path, reference)
            assert verify_store(path) == []
        finally:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)
        print(f"\ntmpfs full after {done} finished blocks; message: {message}")
    else:
        ctx = _workers.context()
        first = start_child(ctx, params_path, tmp_path / "first.json")      # some blocks finish, then SIGKILL
        wait_for(lambda: count_done(path) >= 3, first)
        first.kill()
        first.join()
        # shard files of this store are 2052 bytes: every block write now fails with EFBIG
        child = start_child(ctx, params_path, tmp_path / "fsize.json", fsize_limit=2000)
        child.join(120)
        result = json.loads((tmp_path / "fsize.json").read_text())
        assert not result["ok"] and result["type"] == "StoreSpaceError", result
        assert "file-size limit" in result["message"] and "ulimit -f" in result["message"], result["message"]
        done = count_done(path)
        assert done >= 3 and f"{done} finished blocks are kept" in result["message"], result["message"]
        print(f"\nfile-size limit after {done} finished blocks; message: {result['message']}")
        assert not [p for p in verify_store(path) if p.serious]
        summary = extract(params, MODEL, DATASET, show_progress=False)        # limit lifted
        assert summary["blocks"] == total_blocks(reference) - done
        assert_same_as_reference(path, reference)
        assert verify_store(path) == []


# -- corruption -------------------------------------------------------------------------------------
def _flip(file: Path, where: float = 0.4) -> None:
    data = bytearray(file.read_bytes())
    data[int(len(data) * where)] ^= 0x5A
    file.write_bytes(bytes(data))


def test_verify_names_a_flipped_byte_and_repair_rebuilds_just_that_block(project, reference, capsys):
    from pipeline.cli import main as cli
    params_path, params = project()
    path = store_path(params)
    shutil.copytree(store_path(reference), path)
    assert verify_store(path) == []
    assert cli(["verify", str(path)]) == 0
    _flip(path / "train" / "mean" / "c" / "3" / "0" / "0")         # one byte of one shard
    _flip(path / "test" / "last" / "c" / "7" / "0" / "0", 0.9)     # and one near the end of another
    problems = verify_store(path)
    assert {(p.split, p.array, p.block) for p in problems} == {("train", "mean", 3), ("test", "last", 7)}, problems
    assert all(p.serious for p in problems)
    capsys.readouterr()
    assert cli(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "train/mean block 3" in out and "test/last block 7" in out and "--repair" in out
    assert cli(["verify", str(path), "--repair"]) == 1
    out = capsys.readouterr().out
    assert "2 block(s) marked not done" in out
    summary = extract(params, MODEL, DATASET, show_progress=False)
    assert summary["blocks"] == 2 and summary["texts"] == 10, "only the two damaged blocks are recomputed"
    assert verify_store(path) == []
    assert_same_as_reference(path, reference)


def test_verify_catches_metadata_damage_nan_and_bad_done_marks(project, reference):
    params_path, params = project()
    path = store_path(params)
    shutil.copytree(store_path(reference), path)
    root = zarr.open_group(str(path), mode="r+")
    poolings = root.attrs["poolings"]
    # NaN written with a matching digest (a writer bug, not bit rot): caught by the value check
    values = root["validation"]["max"][0:5]
    values[0, 1, 2] = np.nan
    root["validation"]["max"][0:5] = values
    root["validation"]["_digest"][0, poolings.index("max")] = np.uint64(block_digest(values))
    # a done mark on a block that was never written: its digest cannot match
    root["test"]["_digest"][15] = np.zeros(len(poolings), dtype=np.uint64)
    _flip(path / "train" / "labels" / "c" / "0")                   # row metadata
    problems = {(p.kind, p.split, p.array, p.block) for p in verify_store(path)}
    assert ("nonfinite", "validation", "max", 0) in problems
    assert any(k in ("checksum",) and s == "test" and b == 15 for k, s, a, b in problems)
    assert any(k in ("metadata", "unreadable") and (s, a) == ("train", "labels") for k, s, a, b in problems)
    from pipeline.store.verify import repair
    repaired = repair(path, verify_store(path))
    assert repaired["splits"] == ["train"] and ("validation", 0) in repaired["blocks"]
    extract(params, MODEL, DATASET, show_progress=False)
    assert verify_store(path) == []
    assert_same_as_reference(path, reference)


# -- settings drift ---------------------------------------------------------------------------------
def _drift_weights(params, tmp_path):
    from pipeline.sources.models import materialise
    other = make_tiny_llama(tmp_path / "other-weights", scale=2.0)
    materialise(ModelSpec(name=MODEL, source="local", path=str(other)), params.model_dir(MODEL))


def _drift_tokenizer(params, tmp_path):
    from pipeline.sources.models import materialise
    source = tmp_path / "other-tokenizer"
    shutil.copytree(params.model_dir(MODEL), source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    materialise(ModelSpec(name=MODEL, source="local", path=str(source)), params.model_dir(MODEL))


def test_stores_from_before_xxh3_digests_and_attention_still_verify_and_resume(project, reference):
    """A store as written before this version: blake2b block digests (no `digest` attribute) and no
    `attention` in its fingerprint (it ran sdpa). It verifies against blake2b (the same digests read
    as xxh3 would all be wrong, so the test tells the two apart); with `attention: sdpa` it is
    accepted as complete, with the default `auto` it is refused naming the key."""
    params_path, params = project()
    path = store_path(params)
    shutil.copytree(store_path(reference), path)
    root = zarr.open_group(str(path), mode="r+")
    assert root.attrs["digest"] == "xxh3_64"
    attrs = root.attrs.asdict()
    del attrs["digest"]
    del attrs["fingerprint"]["extract"]["attention"]
    root.attrs.clear()
    root.update_attributes(attrs)
    for split in attrs["splits"]:
        group = root[split]
        digests = group["_digest"][:]
        for block in range(digests.shape[0]):
            start, stop = block * attrs["block_rows"], min((block + 1) * attrs["block_rows"], attrs["splits"][split])
            digests[block] = [block_digest(group[p][start:stop], "blake2b-64") for p in attrs["poolings"]]
        group["_digest"][:] = digests
    assert verify_store(path) == []
    with pytest.raises(StoreMismatchError, match=r"extract\.attention: store has 'sdpa', params give 'auto'"):
        extract(params, MODEL, DATASET, show_progress=False)
    _, legacy = project("legacy", extract={"attention": "sdpa"})
    shutil.rmtree(store_path(legacy), ignore_errors=True)
    shutil.copytree(path, store_path(legacy))
    assert extract(legacy, MODEL, DATASET, show_progress=False)["texts"] == 0   # complete: nothing redone
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["digest"] = "xxh3_64"
    assert {p.kind for p in verify_store(path)} == {"checksum"}


def test_stores_from_before_token_budget_count_as_1024(project, reference):
    """A store whose fingerprint lacks token_budget (written before it was there) resumes with the
    budget params.yaml had then, 1024, and is refused with any other, naming the key."""
    _, params = project()
    path = store_path(params)
    shutil.copytree(store_path(reference), path)
    root = zarr.open_group(str(path), mode="r+")
    fingerprint = root.attrs["fingerprint"]
    assert fingerprint["extract"].pop("token_budget") == 256
    root.attrs["fingerprint"] = fingerprint
    with pytest.raises(StoreMismatchError, match=r"extract\.token_budget: store has 1024, params give 256"):
        extract(params, MODEL, DATASET, show_progress=False)
    _, legacy = project("legacy", extract={"token_budget": 1024})
    shutil.rmtree(store_path(legacy), ignore_errors=True)
    shutil.copytree(path, store_path(legacy))
    assert extract(legacy, MODEL, DATASET, show_progress=False)["texts"] == 0   # complete: nothing redone


@pytest.mark.parametrize("case, key", [
    ("weights", r"model\.weights_sha256: store has '\w+', params give '\w+'"),
    ("tokenizer", r"model\.tokenizer_sha256: store has"),
    ("max_len", r"extract\.max_len: store has 64, params give 32"),
    ("dtype", r"extract\.dtype: store has 'float16', params give 'float32'"),
    ("poolings", r"extract\.poolings: store has \['mean', 'last', 'first', 'max', 'mean_nospecial'\], "
                 r"params give \['mean', 'max'\]"),
    ("block_rows", r"extract\.block_rows: store has 5, params give 7"),
    ("attention", r"extract\.attention: store has 'auto', params give 'sdpa'"),
    ("token_budget", r"extract\.token_budget: store has 256, params give 512"),
    ("dataset", r"dataset\.sha256\.train: store has"),
])
def test_settings_drift_is_refused_naming_the_key(case, key, project, reference, tmp_path, mr_slice):
    """A store written with other weights (another revision), tokenizer, max_len, dtype, poolings,
    block size, attention kernel, token budget (batch shapes move stored values) or dataset content is
    refused before any work, and the message names the key."""
    changes = {"max_len": {"max_len": 32}, "dtype": {"dtype": "float32"}, "poolings": {"poolings": ["mean", "max"]},
               "block_rows": {"block_rows": 7}, "attention": {"attention": "sdpa"}, "token_budget": {"token_budget": 512}}
    mirror = None
    if case == "dataset":
        mirror = tmp_path / "edited-mirror"
        shutil.copytree(mr_slice, mirror)
        lines = (mirror / "mrslice" / "train.jsonl").read_text().splitlines()
        lines[5] = json.dumps({**json.loads(lines[5]), "text": "one edited review"})
        (mirror / "mrslice" / "train.jsonl").write_text("\n".join(lines) + "\n")
    params_path, params = project(extract=changes.get(case), mirror=mirror)
    if mirror is not None:
        write_corpus(build_corpus(params.dataset(DATASET), params.data_mirror, params.data), params.data_dir(DATASET))
    if case == "weights":
        _drift_weights(params, tmp_path)
    if case == "tokenizer":
        _drift_tokenizer(params, tmp_path)
    path = store_path(params)
    shutil.copytree(store_path(reference), path)
    stamp = (path / "zarr.json").stat().st_mtime_ns, done_block_files(path)
    with pytest.raises(StoreMismatchError, match=key) as error:
        extract(params, MODEL, DATASET, show_progress=False)
    assert "--rebuild" in str(error.value)
    if case == "tokenizer":
        assert "weights_sha256" not in str(error.value)
    assert ((path / "zarr.json").stat().st_mtime_ns, done_block_files(path)) == stamp, "the store was touched"


@pytest.mark.slow
def test_a_killed_result_writer_leaves_the_old_file_or_the_new_one(tmp_path):
    """Stage 2 writes results with pipeline/core/atomic.py: SIGKILL at 10 random moments while a process
    rewrites a 2 MB JSON and a CSV in a loop; every file left behind parses whole."""
    target, table = tmp_path / "out" / "scores.json", tmp_path / "out" / "leaderboard.csv"
    script = ("import itertools, sys\n"
              "from pipeline.core.atomic import write_json_atomic, write_text_atomic\n"
              "for i in itertools.count():\n"
              "    write_json_atomic(sys.argv[1], {'version': i, 'rows': [[i, j, 'x' * 60] for j in range(25000)]})\n"
              "    write_text_atomic(sys.argv[2], 'version,row\\n' + ''.join(f'{i},{j}\\n' for j in range(50000)))\n")
    rng = np.random.default_rng(99)
    seen = set()
    for _ in range(10):
        process = subprocess.Popen([sys.executable, "-c", script, str(target), str(table)], cwd=REPO)
        wait_until(target.exists, process, "the first file was written")      # the moments fall among the writes
        time.sleep(float(rng.uniform(0.0, 0.5)))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if target.exists():
            value = json.loads(target.read_text())
            assert len(value["rows"]) == 25000 and {r[0] for r in value["rows"]} == {value["version"]}
            seen.add(value["version"])
        if table.exists():
            lines = table.read_text().splitlines()
            assert len(lines) == 50001 and len({line.split(",")[0] for line in lines[1:]}) == 1
    assert seen
    assert all(p.name.startswith(".") for p in target.parent.iterdir() if p not in (target, table))


# -- audits: atomic writes, no pickle, no shell, trust_remote_code -----------------------------------
SOURCES = sorted([*(p for p in (REPO / "pipeline").rglob("*.py") if "bench" not in p.parts),   # every module but the
                  *(REPO / "stages").glob("*.py")])                          # benchmarks, which write no stage output

NON_ATOMIC = {
    "open for writing": r"\bopen\([^)]*['\"][wax]b?\+?['\"]",
    "write_text": r"\.write_text\(",
    "write_bytes": r"\.write_bytes\(",
    "json.dump": r"\bjson\.dump\(",
    "yaml.dump": r"\byaml\.(safe_)?dump\([^)]*,",
    "torch.save": r"\btorch\.save\(",
    "np.save": r"\bnp\.save[z]?\(",
    "savefig": r"\.savefig\(",
    "to_csv": r"\.to_csv\(",
    "safetensors save_file": r"\bsave_file\(",
    "save_pretrained": r"\.save_pretrained\(",
    "shutil.copy": r"\bshutil\.copy",
}
ALLOWED_WRITES = {   # (file, kind): why it cannot leave half a file that a later stage would accept
    ("pipeline/core/atomic.py", "open for writing"): "the atomic writer itself: a temporary file, then os.replace",
    ("pipeline/sources/models.py", "open for writing"): "_assemble writes into materialise's temporary folder, renamed whole",
    ("pipeline/sources/models.py", "save_pretrained"): "into materialise's temporary build folder, renamed whole",
    ("pipeline/sources/models.py", "shutil.copy"): "into materialise's temporary build folder, renamed whole",
    ("pipeline/heads/export.py", "shutil.copy"): "into the export's temporary .partial folder, renamed whole",
    ("pipeline/report/plots.py", "savefig"): "into an in-memory buffer, then write_bytes_atomic",
    ("pipeline/config/profile.py", "yaml.dump"): "into a string, then write_text_atomic",
}
SUBPROCESS_ALLOWED: set[str] = set()   # files that may start a subprocess (argv lists, never a shell): none now


def _hits(pattern: str) -> list[tuple[str, int, str]]:
    out = []
    for file in SOURCES:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                out.append((str(file.relative_to(REPO)), number, line.strip()))
    return out


def test_result_files_are_written_atomically_everywhere():
    """Every file a stage writes goes through pipeline/core/atomic.py (or Zarr, or a folder renamed whole)."""
    bad = [f"{file}:{number}: {kind}: {line}" for kind, pattern in NON_ATOMIC.items()
           for file, number, line in _hits(pattern) if (file, kind) not in ALLOWED_WRITES]
    assert not bad, ("non-atomic writes (a killed stage could leave half a file); use pipeline.core.atomic "
                     "(safetensors: write_bytes_atomic(path, safetensors.torch.save(tensors))):\n" + "\n".join(bad))


def test_nothing_is_unpickled_and_no_shell_is_built_from_config():
    pickle = _hits(r"\bimport pickle|\bpickle\.|\bjoblib\b|\bdill\b|allow_pickle\s*=\s*True|\btorch\.load\((?!.*weights_only=True)")
    assert not pickle, pickle
    shell = _hits(r"\bos\.system\(|\bos\.popen\(|shell\s*=\s*True|(?<![\w.])eval\(|(?<![\w.])exec\(")
    assert not shell, shell
    spawns = [hit for hit in _hits(r"\bsubprocess\b") if hit[0] not in SUBPROCESS_ALLOWED]
    assert not spawns, spawns
    for file in SUBPROCESS_ALLOWED:
        for _, number, line in _hits(r"subprocess\.(run|Popen|call|check_output)\("):
            assert "[" in line, f"{file}:{number}: a subprocess gets an argv list, never a command string"
    loads = 0
    for file in SOURCES:       # model weights come from safetensors (or a GGUF that is dequantised once)
        text = file.read_text(encoding="utf-8")
        for match in re.finditer(r"(\w+)\.from_pretrained\(", text):
            if "Tokenizer" in match.group(1) or "Config" in match.group(1):
                continue
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[match.start():end]
            assert "use_safetensors=True" in call or "gguf_file" in call, f"{file.name}: {call}"
            loads += 1
    assert loads >= 2


def test_trust_remote_code_comes_only_from_the_model_entry(tmp_path):
    uses = _hits(r"trust_remote_code\s*=(?!=)")
    assert uses
    for file, number, line in uses:
        values = re.findall(r"trust_remote_code\s*=\s*([\w.]+)", line)
        assert set(values) <= {"spec.trust_remote_code", "trust_remote_code", "trust"}, (file, number, line)
    assert not _hits(r"trust_remote_code\s*=\s*True")
    params = load_params(REPO / "params.yaml")
    assert not any(spec.trust_remote_code for spec in params.models.values())
    raw = registry()
    raw["models"]["minilm-l6"]["trust_remote_code"] = "yes"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="trust_remote_code: must be true or false"):
        load_params(tmp_path / "params.yaml")


def _stage_modules() -> list[tuple[str, set[str]]]:
    out = []
    for file in sorted((REPO / "stages").glob("*.py")):
        if file.stem == "__init__":
            continue
        text = file.read_text()
        names = {n for n in ("model", "dataset") if f'add_argument("--{n}"' in text}
        if call := re.search(r"dataset_stage\(__doc__((?:, \"\w+\")*)\)", text):   # it adds --dataset and these
            names |= {"dataset", *re.findall(r"\"(\w+)\"", call.group(1))}
        if names:
            out.append((file.stem, names))
    return out


@pytest.mark.parametrize("evil", ["../escape", "/tmp/escape", "a/../../escape", ".."])
def test_stage_entry_points_refuse_names_that_leave_the_store(evil, tmp_path, mr_slice, make_params, monkeypatch,
                                                              capsys):
    import importlib
    from stages import run_stage
    params_path = make_params(mr_slice, ["minilm-l6"], ["mrslice"])
    before = set(tmp_path.rglob("*"))
    stages = _stage_modules()
    assert {"extract", "prepare_model", "prepare_data", "fuse", "train", "compare", "cost"} <= {name for name, _ in stages}
    for name, arguments in stages:
        module = importlib.import_module(f"stages.{name}")
        argv = [name, "--params", str(params_path)]
        for argument in sorted(arguments):
            argv += [f"--{argument}", evil]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_:
            run_stage(module.main)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (name, err)
        assert re.search(r"unknown (model|dataset)|is not allowed", err), (name, err)
        assert "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before, "a refused stage wrote something"
    assert not Path("/tmp/escape").exists()


# -- bad input not covered by test_bad_input.py -----------------------------------------------------
def test_more_bad_inputs_stop_before_any_work(tmp_path, make_params, monkeypatch, capsys):
    """Missing text column, a GGUF with a wrong sha256, a negative max_len, a token budget smaller than
    one text: each names its cause, and the stage writes nothing."""
    from conftest import write_jsonl
    from pipeline.core.errors import ModelSourceError
    from pipeline.sources.models import materialise
    from stages import run_stage
    import stages.prepare_data as prepare_data
    mirror = tmp_path / "mirror"
    write_jsonl(mirror / "odd" / "train.jsonl", [{"body": f"t{i}", "label": "ab"[i % 2]} for i in range(10)])
    write_jsonl(mirror / "odd" / "test.jsonl", [{"body": "x", "label": "a"}])
    entry = {"text_column": "text", "label_column": "label",
             "local": {"train": "odd/train.jsonl", "test": "odd/test.jsonl"}}
    params_path = make_params(mirror, ["minilm-l6"], ["odd"], extra_datasets={"odd": entry})
    monkeypatch.setattr(sys, "argv", ["prepare_data", "--params", str(params_path), "--dataset", "odd"])
    with pytest.raises(SystemExit):
        run_stage(prepare_data.main)
    assert "has no column 'text'; it has ['body', 'label']" in capsys.readouterr().err
    assert not load_params(params_path).data_dir("odd").exists(), "nothing is written for a refused corpus"
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ModelSourceError, match=r"sha256 of model.gguf is [0-9a-f]{64}, params expect 0{64}"):
        materialise(ModelSpec(name="fake", source="local", path=str(fake), sha256="0" * 64), tmp_path / "models" / "fake")
    assert not (tmp_path / "models" / "fake").exists()
    raw = registry()
    for extract_settings, message in [({"max_len": -5}, "extract.max_len: must be an integer >= 1, got -5"),
                                      ({"max_len": 512, "token_budget": 64}, "extract.token_budget: (64) must be "
                                                                             "at least max_len (512)")]:
        raw["extract"].update(extract_settings)
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError) as error:
            load_params(tmp_path / "bad.yaml")
        assert message in str(error.value)


def test_a_zip_with_a_member_outside_its_folder_is_refused(tmp_path):
    import zipfile
    from pipeline.core.errors import ModelSourceError
    from pipeline.sources.models import materialise
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("model/config.json", "{}")
        handle.writestr("../../escaped.txt", "gotcha")
    with pytest.raises(ModelSourceError, match=r"unsafe path '\.\./\.\./escaped\.txt'"):
        materialise(ModelSpec(name="zipped", source="local", path=str(archive)), tmp_path / "store" / "models" / "zipped")
    assert not (tmp_path.parent / "escaped.txt").exists() and not list(tmp_path.rglob("escaped.txt"))
