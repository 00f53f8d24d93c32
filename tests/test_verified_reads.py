"""Stage 2 reads only verified store data: a deleted shard, a flipped byte or a damaged zarr.json stops
score, fuse, train, predict and export with a message naming `python -m pipeline verify --repair`,
instead of computing on zeros or garbage (issue 11). Verification is per block, cached by file identity."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from _stage2_store import make_store
from pipeline.core.errors import StoreDamagedError
from pipeline.store.reader import _VERIFIED, EmbeddingStore, open_store

MODEL, DATASET = "minilm-l6", "toy"        # a registry model name, so params.yaml accepts it
ZSTD = {"codec": "zstd", "level": 1}       # as params.yaml writes real stores
REPAIR = "python -m pipeline verify --repair"


def _flip(file: Path, where: float = 0.4) -> None:
    data = bytearray(file.read_bytes())
    data[int(len(data) * where)] ^= 0x5A
    file.write_bytes(bytes(data))


def _shard(store: Path, split: str, pooling: str, block: int) -> Path:
    return store / split / pooling / "c" / str(block) / "0" / "0"


def _run_stage(name: str, params: Path, monkeypatch, capsys, **arguments) -> tuple[int, str]:
    """A stage's entry point as DVC runs it (run_stage: exit 2 and `error: ...` on a PipelineError)."""
    from stages import run_stage
    module = importlib.import_module(f"stages.{name}")
    argv = [name, "--params", str(params)] + [f"--{k}={v}" for k, v in arguments.items()]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    try:
        run_stage(module.main)
    except SystemExit as exit_:
        return int(exit_.code), capsys.readouterr().err
    return 0, capsys.readouterr().err


def _stages(params: Path, monkeypatch, capsys) -> dict[str, tuple[int, str]]:
    from pipeline.cli import main as cli
    out = {"score": _run_stage("score", params, monkeypatch, capsys, model=MODEL, dataset=DATASET),
           "fuse": _run_stage("fuse", params, monkeypatch, capsys, dataset=DATASET),
           "train": _run_stage("train", params, monkeypatch, capsys, dataset=DATASET, head="linear")}
    for command in (["predict", "a text"], ["export", str(params.parent / "exported")]):
        capsys.readouterr()
        code = cli([command[0], "--params", str(params), "--dataset", DATASET, *command[1:]])
        out[command[0]] = (code, capsys.readouterr().err)
    return out


def _main(name: str, params: Path, **arguments) -> None:
    module = importlib.import_module(f"stages.{name}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [name, "--params", str(params)] + [f"--{k}={v}" for k, v in arguments.items()])
        module.main()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """A project whose score, fuse and train stages ran on a small zstd/float16 store."""
    from conftest import registry
    folder = tmp_path_factory.mktemp("verified")
    raw = registry()
    raw["paths"] = {"store": "store", "data_mirror": "mirror"}          # relative: the folder can be copied
    raw["select"] = {"models": [MODEL], "datasets": [DATASET]}
    raw["datasets"][DATASET] = {"text_column": "text", "label_column": "label",
                                "local": {"train": "toy/train.jsonl", "test": "toy/test.jsonl"}}
    raw["score"].update(rank=8, pca_rows=200, bootstrap=10)
    raw["fuse"].update(top_k=3, last_n=3)
    raw["train"].update(heads=["linear"], seeds=[0], max_epochs=2, batch_size=64)
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    make_store(folder / "store", MODEL, DATASET, dtype="float16", compressor=ZSTD)
    _main("score", params, model=MODEL, dataset=DATASET)
    _main("fuse", params, dataset=DATASET)
    _main("train", params, dataset=DATASET, head="linear")
    _main("compare", params, dataset=DATASET)
    return folder


@pytest.fixture
def project(healthy, tmp_path):
    """A copy of the healthy project; returns (params.yaml, the store folder)."""
    folder = tmp_path / "project"
    shutil.copytree(healthy, folder)
    return folder / "params.yaml", folder / "store" / "embeddings" / DATASET / MODEL


def _best_pooling(params: Path) -> str:
    store = params.parent / "store"
    return json.loads((store / "scores" / DATASET / MODEL / "scores.json").read_text())["best_pooling"]


@pytest.mark.parametrize("damage", ["deleted shard", "flipped byte"])
def test_a_damaged_shard_stops_every_stage2_reader_naming_verify_repair(damage, project, monkeypatch, capsys):
    params, store = project
    pooling = _best_pooling(params)                 # fuse, train and predict read this pooling too
    shard = _shard(store, "train", pooling, 1)
    if damage == "deleted shard":
        shard.unlink()
    else:
        _flip(shard)
    for stage, (code, err) in _stages(params, monkeypatch, capsys).items():
        assert code == 2, (stage, err)
        assert f"train/{pooling} block 1 is damaged" in err and f"{REPAIR} {store}" in err, (stage, err)
        assert "Traceback" not in err


def test_repair_then_reextraction_is_what_the_message_asks_for(project):
    """The message's command finds exactly the block the reader named."""
    from pipeline.store.verify import verify_store
    params, store = project
    _flip(_shard(store, "validation", "last", 0))
    with pytest.raises(StoreDamagedError, match="validation/last block 0") as error:
        EmbeddingStore(store).layer("validation", "last", 2)
    assert REPAIR in str(error.value)
    assert [(p.split, p.array, p.block) for p in verify_store(store) if p.serious] == [("validation", "last", 0)]


def test_reads_are_verified_once_per_block_and_again_when_the_file_changes(tmp_path):
    path = make_store(tmp_path, MODEL, DATASET, dtype="float16", compressor=ZSTD)
    store = open_store(tmp_path / "embeddings", MODEL, DATASET)
    mine = lambda: {i for i in _VERIFIED if str(i[0]).startswith(str(path))}   # noqa: E731
    first = store.layer("train", "mean", 0)
    assert len(mine()) == 4                                   # 240 train rows: 4 blocks of 64, each checked once
    np.testing.assert_array_equal(store.layer("train", "mean", 0), first)
    store.layer("train", "mean", 5, rows=slice(0, 10))
    assert len(mine()) == 4, "a verified block is not checked again"
    store.layer("validation", "last", 1, rows=slice(70, 80))     # only the block these rows lie in
    assert len(mine()) == 5
    _flip(_shard(path, "train", "mean", 2))                  # a rewrite: new mtime and ctime, so checked again
    with pytest.raises(StoreDamagedError, match="train/mean block 2"):
        store.layer("train", "mean", 0)
    with pytest.raises(StoreDamagedError, match="train/mean block 2"):
        store.layer("train", "mean", 3, rows=slice(130, 140))  # every reader path, not only full reads
    np.testing.assert_array_equal(store.layer("train", "mean", 0, rows=slice(0, 128)), first[:128])
    assert EmbeddingStore(path, verified=False).layer("train", "mean", 4).shape == (240, 16)   # bench baseline


@pytest.mark.parametrize("held_bytes", [2**30, 3 * 64 * 6 * 16 * 2], ids=["all held", "three blocks held"])
def test_reads_from_held_blocks_equal_plain_zarr_reads(held_bytes, tmp_path, monkeypatch):
    """One-layer reads after verification are sliced from the decoded blocks: bit-equal to zarr's reads,
    for any rows, and when only part of a pooling fits the budget."""
    import pipeline.store.reader
    monkeypatch.setattr(pipeline.store.reader, "HELD_BYTES", held_bytes)
    path = make_store(tmp_path, MODEL, DATASET, dtype="float16", compressor=ZSTD)
    plain, checked = EmbeddingStore(path, verified=False), EmbeddingStore(path)
    for rows in (slice(None), slice(10, 200, 3), slice(63, 65), slice(230, 240), slice(-20, None), slice(5, 5)):
        for split, pooling, layer in (("train", "mean", 0), ("train", "mean", -1), ("validation", "mean", 2),
                                      ("train", "last", 4), ("train", "mean", 3)):
            ours, theirs = checked.layer(split, pooling, layer, rows), plain.layer(split, pooling, layer, rows)
            assert ours.dtype == theirs.dtype == np.float32
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{split}/{pooling} {layer} {rows}")
    held = sum(layer.nbytes for _, layers in checked._held.values() for layer in layers)
    assert 0 < held <= held_bytes and checked._held_pooling == "last"     # the pooling verified last
    checked.release()
    assert not checked._held


def test_damaged_row_metadata_and_digests_are_named(tmp_path):
    path = make_store(tmp_path, MODEL, DATASET, dtype="float16", compressor=ZSTD)
    _flip(path / "test" / "labels" / "c" / "0", 0.6)
    with pytest.raises(StoreDamagedError, match=f"test/labels is damaged.*{REPAIR}"):
        EmbeddingStore(path).labels("test")
    (path / "validation" / "_digest" / "c" / "1" / "0").unlink()        # a lost digest reads as 0: no match
    with pytest.raises(StoreDamagedError, match="validation/mean block 1"):
        EmbeddingStore(path).layer("validation", "mean", 0)


def test_a_check_covers_row_metadata_and_a_lost_done_mark_is_named(tmp_path):
    """Issue 22, item 9: predict's check of a head's store (EmbeddingStore.check) reads the row metadata
    against its recorded checksums too; a deleted `_done` chunk names the block that lost its mark."""
    from pipeline.core.errors import StoreIncompleteError
    path = make_store(tmp_path, MODEL, DATASET, dtype="float16", compressor=ZSTD)
    _flip(path / "validation" / "text_id" / "c" / "0", 0.5)
    EmbeddingStore(path).layer("validation", "mean", 0)              # the vectors alone are intact
    with pytest.raises(StoreDamagedError, match="validation/text_id is damaged"):
        EmbeddingStore(path).check(["mean"])
    (path / "train" / "_done" / "c" / "2").unlink()
    with pytest.raises(StoreIncompleteError, match=r"block\(s\) \[2\] hold vectors and digests but no done mark"):
        EmbeddingStore(path).layer("train", "mean", 0)


def test_repair_deletes_damaged_dvc_cache_objects_linked_to_the_store(tmp_path):
    """Under DVC (cache.type hardlink or symlink) a store file and its cache object are one file: a flipped
    byte damages both, and once DVC commits the damaged file (by copy) the damaged object named by the
    original md5 is linked to nothing. DVC trusts it and would link it back after re-extraction; repair
    deletes it, the objects linked to the damaged files, and nothing else."""
    import hashlib
    from pipeline.store.verify import repair, verify_store
    path = make_store(tmp_path / "repo" / "store", MODEL, DATASET, dtype="float16", compressor=ZSTD)
    cache = tmp_path / "repo" / ".dvc" / "cache" / "files" / "md5"

    def obj(name: str) -> Path:
        (cache / name[:2]).mkdir(parents=True, exist_ok=True)
        return cache / name[:2] / name[2:]

    shard, labels = _shard(path, "train", "mean", 1), path / "test" / "labels" / "c" / "0"
    original = hashlib.md5(shard.read_bytes()).hexdigest()
    os.link(shard, obj("ab" + "0" * 30))                           # hardlinked to the store file
    intact = obj(hashlib.md5(_shard(path, "train", "mean", 0).read_bytes()).hexdigest())
    os.link(_shard(path, "train", "mean", 0), intact)              # an intact block: left alone
    (link_target := obj("cd" + "1" * 30)).write_bytes(labels.read_bytes())
    labels.unlink()
    labels.symlink_to(link_target)                                 # cache.type symlink
    _flip(shard)
    _flip(labels, 0.6)
    orphan = obj(original)
    orphan.write_bytes(shard.read_bytes())       # the damaged bytes under the original name, linked to nothing
    committed = obj(hashlib.md5(shard.read_bytes()).hexdigest())
    committed.write_bytes(shard.read_bytes())    # the damaged version committed under its own md5: consistent
    problems = [p for p in verify_store(path) if p.serious]
    assert {(p.split, p.array, p.block) for p in problems} == {("train", "mean", 1), ("test", "labels", None)}
    done = repair(path, problems)
    assert sorted(done["cache_objects_removed"]) == sorted(str(p) for p in (obj("ab" + "0" * 30), orphan, link_target))
    assert done["links_not_found"] == 0
    assert not shard.exists() and not labels.exists() and intact.exists() and committed.exists()
    assert {p.kind for p in verify_store(path)} == {"incomplete"}    # left for the extraction to rebuild


def test_a_damaged_root_zarr_json_is_named_not_taken_for_a_missing_store(project, monkeypatch, capsys):
    from pipeline.cli import main as cli
    params, store = project
    root = store / "zarr.json"
    root.write_bytes(root.read_bytes()[: len(root.read_bytes()) // 2])        # torn: no longer JSON
    code, err = _run_stage("score", params, monkeypatch, capsys, model=MODEL, dataset=DATASET)
    assert code == 2 and "root metadata (zarr.json) is damaged" in err and "--rebuild" in err, err
    assert "run `dvc repro`" not in err
    capsys.readouterr()
    assert cli(["inspect", str(store)]) == 2
    assert "zarr.json) is damaged" in capsys.readouterr().err
    shutil.rmtree(store)                                     # and a missing store is a clear message too
    code, err = _run_stage("score", params, monkeypatch, capsys, model=MODEL, dataset=DATASET)
    assert code == 2 and "no embeddings store at" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_dvc_repro_stops_at_the_first_reader_of_a_damaged_store(tmp_path, mr_slice):
    from test_dvc_stage1 import clone_project, run
    repo = clone_project(tmp_path, mr_slice, {"models": [MODEL], "datasets": ["mrslice"]},
                         stages=["prepare_model", "prepare_data", "extract", "score"])
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["score"].update(rank=32, pca_rows=200, bootstrap=20)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["dvc", "repro"], repo)
    scores = repo / "store" / "scores" / "mrslice" / MODEL / "scores.json"
    before = json.loads(scores.read_text())
    lock = (repo / "dvc.lock").read_text()
    store = repo / "store" / "embeddings" / "mrslice" / MODEL
    _flip(_shard(store, "train", "mean", 2))

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    failed = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output
    assert "train/mean block 2 is damaged" in output and f"{REPAIR} {store}" in output, output
    locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert locked["score@minilm-l6-mrslice"] == yaml.safe_load(lock)["stages"]["score@minilm-l6-mrslice"], \
        "the failed score stage is not recorded"

    repair = subprocess.run([sys.executable, "-m", "pipeline", "verify", "--repair", str(store)], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert "1 block(s) marked not done [('train', 2)]" in repair.stdout, repair.stdout + repair.stderr
    assert "damaged cache object(s) deleted" in repair.stdout     # this repo's DVC cache links files (hardlink)
    again = run(["dvc", "repro"], repo)                      # re-extracts the one block, then scores again
    assert "Running stage 'score@minilm-l6-mrslice'" in again
    after = json.loads(scores.read_text())
    assert [r["score"] for r in after["rows"]] == [r["score"] for r in before["rows"]]


@pytest.mark.slow
def test_remote_stores_are_verified_and_cached_by_etag(tmp_path, monkeypatch):
    """The same on S3 (moto's server): a deleted object or a rewritten one with other bytes is named;
    verified blocks are cached by (key, size, ETag)."""
    import boto3
    import uuid
    from pipeline.bench.s3_server import start_moto_server
    server, endpoint = start_moto_server()
    try:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}.items():
            monkeypatch.setenv(key, value)
        bucket = f"emb-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=bucket)
        local = make_store(tmp_path, MODEL, DATASET, dtype="float16", compressor=ZSTD)
        prefix = f"emb/{DATASET}/{MODEL}"
        for file in local.rglob("*"):
            if file.is_file():
                client.upload_file(str(file), bucket, f"{prefix}/{file.relative_to(local)}")
        url = f"s3://{bucket}/{prefix}"
        store = EmbeddingStore(url)
        np.testing.assert_array_equal(store.layer("train", "mean", 3), EmbeddingStore(local).layer("train", "mean", 3))
        cached = {i for i in _VERIFIED if str(i[0]).startswith(url)}
        assert len(cached) == 4 and all(len(i) == 3 and i[2] for i in cached), cached
        key = f"{prefix}/train/mean/c/2/0/0"
        data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[len(data) // 3] ^= 0x5A
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data))             # same size, new ETag
        with pytest.raises(StoreDamagedError, match=f"train/mean block 2 is damaged.*{REPAIR} {url}"):
            store.layer("train", "mean", 3)
        client.delete_object(Bucket=bucket, Key=f"{prefix}/validation/last/c/0/0/0")
        with pytest.raises(StoreDamagedError, match="validation/last block 0 is damaged: its shard file is missing"):
            EmbeddingStore(url).layer("validation", "last", 0)
    finally:
        server.terminate()
        server.wait(timeout=10)


# -- one build per read (issue 22, item 4) ----------------------------------------------------------------
def test_a_reader_never_returns_values_of_a_build_it_did_not_open(tmp_path, monkeypatch):
    """The race the hostile run found (a slow score while `extract --rebuild` replaced the store), made
    deterministic: the rebuild lands after the reader verified a block and before it reads it. Every read
    after that fails naming the rebuild; a fresh reader reads the new build whole."""
    from pipeline.core.errors import StoreChangedError
    path = make_store(tmp_path, "toy-a", seed=0)
    reader = EmbeddingStore(path)
    old = reader.layer("train", "mean", 2)                              # build A, held for later reads
    verify = EmbeddingStore._verify_rows
    rebuilt = []

    def verify_then_rebuild(self, *args, **kwargs):
        result = verify(self, *args, **kwargs)
        if not rebuilt:                                  # the rebuild happens between the check and the read
            rebuilt.append(make_store(tmp_path, "toy-a", seed=1, rebuild=True))
        return result

    monkeypatch.setattr(EmbeddingStore, "_verify_rows", verify_then_rebuild)
    with pytest.raises(StoreChangedError, match="was rebuilt while this process read it"):
        reader.layer("train", "last", 4)
    monkeypatch.setattr(EmbeddingStore, "_verify_rows", verify)
    for read in (lambda: reader.layer("train", "mean", 2), lambda: reader.layers("validation", "mean"),
                 lambda: reader.labels("test"), lambda: reader.meta("train", "text_id"),
                 lambda: reader.check(["mean"])):
        with pytest.raises(StoreChangedError, match="mix two builds"):
            read()
    fresh = EmbeddingStore(path)
    assert fresh.build != reader.build and not np.array_equal(fresh.layer("train", "mean", 2), old)
    independent = np.random.default_rng(1).normal(size=(240, 6, 16)).astype(np.float32)   # make_store's draw
    assert fresh.layer("train", "mean", 2)[0, 5] == pytest.approx(independent[0, 2, 5] * 10.0 ** (2 % 3))


def test_a_rebuild_that_has_begun_fails_a_reader_of_the_old_build(tmp_path, monkeypatch):
    """--rebuild deletes the root zarr.json before any chunk: a read that passes the build check read no
    chunk of a half-deleted store (zarr reads a missing chunk as zeros)."""
    from pipeline.core import location
    from pipeline.core.errors import StoreChangedError
    path = make_store(tmp_path, "toy-a")
    reader = EmbeddingStore(path)
    removed = []
    for name in ("remove", "unlink"):                   # shutil.rmtree unlinks; location.remove(first=) removes
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda file, *a, _real=real, **k: (removed.append(Path(file).name),
                                                                        _real(file, *a, **k))[1])
    make_store(tmp_path, "toy-a", seed=1, rebuild=True)
    monkeypatch.undo()
    assert removed[0] == "zarr.json" and len(removed) > 10   # the old build is retired before anything goes
    os.remove(path / "zarr.json")                       # a store caught mid-rebuild: chunks there, no root
    assert location.exists(path)
    with pytest.raises(StoreChangedError, match="is being rebuilt or was removed"):
        reader.layer("test", "mean", 1)


# -- damage versus failure (issue 22, item 2) ---------------------------------------------------------------
FAULTS = {                                   # what the hostile run injected, and where
    "memory-on-a-shard": ("train/mean/c/", MemoryError()),
    "permission-on-labels": ("train/labels/zarr.json", PermissionError(13, "Permission denied")),
    "open-file-limit-on-root": ("zarr.json", OSError(24, "Too many open files")),
    "no-thread-on-a-shard": ("validation/last/c/", RuntimeError("can't start new thread")),
    "connection-on-digests": ("test/_digest/", ConnectionError("connection reset by peer")),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failure_is_not_damage_and_repair_changes_nothing(tmp_path, monkeypatch, capsys, fault):
    """A read that fails for a reason outside the store (memory, permissions, open files, threads, the
    network) is named as a failure with retry advice by verify and by every reader; `verify --repair` on a
    healthy store then marks, drops and deletes nothing."""
    import zarr.storage
    from pipeline.cli import main as cli
    from pipeline.core.errors import StoreAccessError
    path = make_store(tmp_path, "toy-a", dtype="float16")       # float16: what verify expects by default
    before = _snapshot(path)
    key, error = FAULTS[fault]
    get = zarr.storage.LocalStore.get

    async def failing_get(self, name, *args, **kwargs):
        if name == key or (key.endswith("/") and name.startswith(key)):
            raise error
        return await get(self, name, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", failing_get)
    _VERIFIED.clear()
    assert cli(["verify", "--repair", str(path)]) == 1
    out = capsys.readouterr().out
    assert "failure:" in out and "not damage" in out and "nothing was marked or deleted" in out, out
    assert "repaired" not in out and "damaged" not in out
    split, name = (key.split("/") + ["", ""])[:2]
    with pytest.raises(StoreAccessError, match="not damage to the store"):
        store = EmbeddingStore(path)
        if name in ("mean", "last", "_digest"):
            store.layer(split, name if name != "_digest" else "mean", 1)
        else:
            store.labels(split)
    monkeypatch.undo()
    assert _snapshot(path) == before, "a failure changed the store"
    _VERIFIED.clear()
    assert cli(["verify", str(path)]) == 0                     # the same store, read whole once the fault is gone
