"""Corpora: read a dataset entry (local mirror or hub) through `datasets`, check every row, carve
a seeded stratified validation split when there is none, and write a normalised copy.

The normalised copy under store/data/<dataset>/ is what extraction reads: one JSONL per split
(`id`, `text`, `label`, `source_split`, `source_index`) and meta.json (label names, per-split
sha256, dropped rows and why, the carve's fraction and seed). Selection later uses validation only.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import write_json_atomic, write_text_atomic
from pipeline.config.sections import DATA_FORMATS, DataSettings, DatasetSpec
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.fingerprint import sha256_rows

SPLIT_ORDER = ("train", "validation", "test")


@dataclass
class Split:
    ids: list[str]
    texts: list[str]
    labels: list[str]
    source_split: list[str]
    source_index: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices) -> "Split":
        return Split(*[[column[i] for i in indices] for column in
                       (self.ids, self.texts, self.labels, self.source_split, self.source_index)])


@dataclass
class Corpus:
    name: str
    splits: dict[str, Split]
    label_names: list[str]
    meta: dict[str, Any]


def _first_bad_jsonl_line(path: Path) -> tuple[int, str] | None:
    """(line number, what is wrong) of the first line of a JSONL file that is not UTF-8 or not one JSON
    object, so the error names the place; pyarrow's own messages name neither."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, f"is not valid UTF-8 ({error}): fix or re-encode the file (e.g. iconv -f latin1 -t utf-8)"
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                return number, f"is not valid JSON ({error.msg} at column {error.colno}): {line.strip()[:80]!r}"
            if not isinstance(value, dict):
                return number, f"holds a JSON {type(value).__name__}, not an object with the text and label columns"
            for column, field in value.items():
                if isinstance(field, str) and (where := _lone_surrogate(field)) is not None:
                    return number, (f"column {column!r} character {where} is a lone UTF-16 surrogate "
                                    f"({field[where]!r}), which is not text: fix the file")
    return None


def _lone_surrogate(text: str) -> int | None:
    """Where a string holds half of a UTF-16 pair (JSON's "\\ud800" escape decodes to one), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _load_local(spec: DatasetSpec, mirror: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import datasets

    files = {split: mirror / rel for split, rel in spec.local.items()}
    formats = {DATA_FORMATS[Path(f).suffix] for f in files.values()}
    if len(formats) != 1:
        raise ConfigError(f"datasets.{spec.name}.local mixes file types {sorted(formats)}: use one per dataset")
    for split, path in files.items():
        if path.stat().st_size == 0 or not path.read_bytes().strip():
            raise DataError(f"{path} (datasets.{spec.name}.local.{split}) is empty: it holds no rows; "
                            f"nothing was extracted")
        if formats == {"json"} and (bad := _first_bad_jsonl_line(path)):
            raise DataError(f"{path} line {bad[0]} {bad[1]}; nothing was extracted")
    try:
        loaded = datasets.load_dataset(formats.pop(), data_files={s: str(p) for s, p in files.items()})
    except Exception as error:  # pyarrow and datasets raise many types for malformed files
        raise DataError(f"cannot read dataset {spec.name!r} from {mirror}: {error}") from error
    source = {"kind": "local", "files": {s: str(Path(spec.local[s])) for s in files}}
    return {split: loaded[split] for split in files}, source


def _load_hub(spec: DatasetSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    import datasets

    hub = spec.hub
    try:
        loaded = {ours: datasets.load_dataset(hub.path, hub.config, revision=hub.revision, split=theirs)
                  for ours, theirs in hub.splits.items()}
    except Exception as error:
        raise DataError(f"cannot load dataset {spec.name!r} from the hub ({hub.path}): {error}. "
                        f"Offline? Put its files under paths.data_mirror as listed in datasets.{spec.name}.local"
                        ) from error
    source = {"kind": "hub", "path": hub.path, "config": hub.config, "revision": hub.revision, "splits": hub.splits}
    return loaded, source


def load_source(spec: DatasetSpec, mirror: Path | None) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """The raw splits (datasets.Dataset objects), a description of where they came from, and columns."""
    local_files = [mirror / rel for rel in spec.local.values()] if mirror and spec.local else []
    if local_files and all(f.is_file() for f in local_files):
        splits, source = _load_local(spec, mirror)
        return splits, source, spec.text_column, spec.label_column
    if spec.hub:
        splits, source = _load_hub(spec)
        return splits, source, spec.hub.text_column or spec.text_column, spec.hub.label_column or spec.label_column
    missing = [str(f) for f in local_files if not f.is_file()] or [f"{mirror}/<{spec.local}>"]
    raise DataError(f"dataset {spec.name!r}: local files missing ({', '.join(missing)}) and no `hub` entry; "
                    f"set paths.data_mirror or add datasets.{spec.name}.hub")


def _label_decoder(dataset, column: str):
    feature = dataset.features.get(column)
    if feature is not None and hasattr(feature, "int2str"):
        return lambda value: None if value is None or value < 0 else feature.int2str(int(value))
    return lambda value: value


def _label_problem(value: Any) -> str | None:
    """Why a label cannot name a class, or None. Strings (non-empty, no surrounding whitespace) and integers
    only: str() of a list, a float or a padded string would silently make a class of its own."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"is a {type(value).__name__}, not a string or an integer"
    if isinstance(value, str) and (not value or value != value.strip()):
        return "is empty" if not value else "has surrounding whitespace"
    return None


def _normalise(name: str, split: str, dataset, text_column: str, label_column: str, id_column: str | None,
               on_bad_row: str, dropped: list[dict[str, Any]]) -> Split:
    for column in (text_column, label_column) + ((id_column,) if id_column else ()):
        if column not in dataset.column_names:
            raise DataError(f"dataset {name!r} split {split!r} has no column {column!r}; it has "
                            f"{dataset.column_names}: set datasets.{name}.text_column / label_column")
    if len(dataset) == 0:
        raise DataError(f"dataset {name!r} split {split!r} is empty: check its file or hub split name")
    decode = _label_decoder(dataset, label_column)
    ids = dataset[id_column] if id_column else [f"{split}-{i}" for i in range(len(dataset))]
    out = Split([], [], [], [], [])
    for index, (text, raw_label, row_id) in enumerate(zip(dataset[text_column], dataset[label_column], ids)):
        label = decode(raw_label)
        reason = None
        if not isinstance(text, str):
            reason = f"text is {type(text).__name__}, not a string"
        elif not text.strip():
            reason = "empty or whitespace-only text"
        elif label is None:
            reason = "missing label"
        elif problem := _label_problem(label):
            raise DataError(f"dataset {name!r} split {split!r} row {index}: label {label!r} {problem}; labels are "
                            f"strings without surrounding whitespace, or integers: fix the file")
        if reason:
            if on_bad_row == "error":
                raise DataError(f"dataset {name!r} split {split!r} row {index}: {reason}; fix the row or set "
                                f"data.on_bad_row: drop (dropped rows are recorded in the store)")
            dropped.append({"split": split, "source_index": index, "id": str(row_id), "reason": reason})
            continue
        out.ids.append(str(row_id))
        out.texts.append(text)
        out.labels.append(str(label))
        out.source_split.append(split)
        out.source_index.append(index)
    if not out.texts:
        raise DataError(f"dataset {name!r} split {split!r} has no usable rows ({len(dropped)} dropped)")
    return out


def _by_label(labels: list[str]) -> dict[str, list[int]]:
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    return by_label


def stratified_carve(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split of row indices into (keep, carved). A class of one row stays in train."""
    rng = np.random.default_rng(seed)
    carved: list[int] = []
    by_label = _by_label(labels)
    for label in sorted(by_label):
        members = np.array(by_label[label])
        if len(members) < 2:
            continue
        count = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        carved.extend(rng.permutation(members)[:count].tolist())
    carved_set = set(carved)
    return [i for i in range(len(labels)) if i not in carved_set], sorted(carved)


def _spans(tokens: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Every contiguous token span of a text, the text itself included."""
    return {tokens[i:j] for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1)}


def whole_text_carve(texts: list[str], labels: list[str], fraction: float,
                     seed: int) -> tuple[list[int], list[int], int]:
    """(keep, carved, phrases dropped): validation from whole texts only, train without their phrases.

    SST-2's train split holds every labelled phrase of its sentences, while its test split holds whole
    sentences; rows carved at random are mostly short phrases whose sentence stays in train, which flatters
    validation. Here validation is a stratified `fraction` of the texts that are no proper token span of
    another row, and every row that is a span of a validation text leaves train."""
    tokens = [tuple(text.split()) for text in texts]
    inner: set[tuple[str, ...]] = set()
    for row in tokens:
        inner |= _spans(row) - {row}
    whole = [i for i, row in enumerate(tokens) if row and row not in inner]
    _, picked = stratified_carve([labels[i] for i in whole], fraction, seed)
    carved = sorted(whole[i] for i in picked)
    covered = set().union(*(_spans(tokens[i]) for i in carved)) if carved else set()
    carved_set = set(carved)
    keep = [i for i in range(len(texts)) if i not in carved_set and tokens[i] not in covered]
    return keep, carved, len(texts) - len(keep) - len(carved)


def stratified_sample(labels: list[str], rows: int, seed: int) -> list[int]:
    """`rows` row indices (sorted), each class keeping its share (largest remainders), at least one row
    per class where the cap allows: a capped split keeps the label balance of the full one."""
    by_label = _by_label(labels)
    if rows >= len(labels):
        return list(range(len(labels)))
    shares = {label: rows * len(members) / len(labels) for label, members in by_label.items()}
    counts = {label: min(len(by_label[label]), max(1, int(share))) for label, share in shares.items()}
    by_remainder = sorted(by_label, key=lambda label: (-(shares[label] - int(shares[label])), label))
    while sum(counts.values()) < rows:            # largest remainders first, never past a class's size
        for label in by_remainder:
            if sum(counts.values()) < rows and counts[label] < len(by_label[label]):
                counts[label] += 1
    for label in sorted(by_label, key=lambda label: -counts[label]):   # min-one rounding may overshoot
        while sum(counts.values()) > rows and counts[label] > 1:
            counts[label] -= 1
    rng = np.random.default_rng(seed)
    chosen = [i for label in sorted(by_label)
              for i in rng.permutation(np.array(by_label[label]))[:counts[label]].tolist()]
    return sorted(chosen)


def _resplit(name: str, splits: dict[str, Split], resplit: dict[str, Any], seed: int) -> dict[str, Any]:
    """Share one split out into train / validation / the rest (stratified, seeded), e.g. AGNews offline,
    whose 120k train set is not mirrored: its 7,600 test rows become train, validation and test."""
    source = resplit["from"]
    if set(splits) != {source}:
        raise DataError(f"dataset {name!r}: resplit takes a corpus shipped as its {source!r} split alone; "
                        f"this one has {sorted(splits)}: drop datasets.{name}.resplit")
    pool = splits.pop(source)
    rest, train = stratified_carve(pool.labels, resplit["train"], seed)
    splits["train"] = pool.take(train)
    rest_split = pool.take(rest)
    if "validation" in resplit:
        fraction = resplit["validation"] / (1 - resplit["train"])
        keep, validation = stratified_carve(rest_split.labels, fraction, seed + 1)
        splits["validation"] = rest_split.take(validation)
        rest_split = rest_split.take(keep)
    splits["test"] = rest_split
    return {**resplit, "seed": seed, "rows": {s: len(v) for s, v in splits.items()}}


def _cap(splits: dict[str, Split], max_rows: dict[str, int], seed: int) -> dict[str, Any] | None:
    """Cap each split at data.max_rows[split] rows by a stratified, seeded sample; recorded in meta
    (and so in the store fingerprint) with the uncapped row counts."""
    caps = {}
    for split_name, cap in max_rows.items():
        split = splits.get(split_name)
        if split is not None and len(split) > cap:
            splits[split_name] = split.take(stratified_sample(split.labels, cap, seed))
            caps[split_name] = {"cap": cap, "rows_before": len(split)}
    return caps or None


def build_corpus(spec: DatasetSpec, mirror: Path | None, settings: DataSettings) -> Corpus:
    """Read, check and split a corpus; raises DataError before any model work on bad input."""
    raw, source, text_column, label_column = load_source(spec, mirror)
    dropped: list[dict[str, Any]] = []
    splits = {split: _normalise(spec.name, split, raw[split], text_column, label_column, spec.id_column,
                                settings.on_bad_row, dropped) for split in SPLIT_ORDER if split in raw}
    resplit = _resplit(spec.name, splits, spec.resplit.as_dict(), settings.seed) if spec.resplit else None
    if "train" not in splits:
        raise DataError(f"dataset {spec.name!r} has no train split (it has {sorted(splits)}): a probe and a head "
                        f"need one. Add a train file, or share one split out with datasets.{spec.name}.resplit: "
                        f"{{from: test, train: 0.6, validation: 0.1}}")
    carve = None
    if "validation" not in splits:
        train, phrases = splits["train"], None
        if spec.carve == "whole_texts":
            keep, carved, phrases = whole_text_carve(train.texts, train.labels, settings.validation_fraction,
                                                     settings.seed)
        else:
            keep, carved = stratified_carve(train.labels, settings.validation_fraction, settings.seed)
        splits["validation"], splits["train"] = train.take(carved), train.take(keep)
        carve = {"from": "train", "fraction": settings.validation_fraction, "seed": settings.seed,
                 "rows": len(carved),
                 **({"by": "whole_texts", "phrases_dropped_from_train": phrases} if phrases is not None else {})}
    elif spec.carve != "rows":
        raise DataError(f"dataset {spec.name!r}: datasets.{spec.name}.carve is {spec.carve!r}, but this corpus "
                        f"has a validation split already; drop the carve key")
    counts = Counter(splits["train"].labels)
    if len(counts) < 2:
        raise DataError(f"dataset {spec.name!r}: train has a single class {list(counts)}; "
                        f"a classifier needs at least two")
    label_names = sorted(counts)
    known = set(label_names)
    for split_name in ("validation", "test"):
        split = splits.get(split_name)
        if split is None:
            continue
        unknown = [i for i, label in enumerate(split.labels) if label not in known]
        if unknown and settings.on_bad_row == "error":
            example = split.labels[unknown[0]]
            raise DataError(f"dataset {spec.name!r} split {split_name!r}: {len(unknown)} row(s) carry labels that "
                            f"train never has (e.g. {example!r}, source row {split.source_index[unknown[0]]}); "
                            f"set data.on_bad_row: drop to drop them")
        for i in unknown:
            dropped.append({"split": split_name, "source_index": split.source_index[i], "id": split.ids[i],
                            "reason": f"label {split.labels[i]!r} not in train"})
        if unknown:
            unknown_set = set(unknown)
            splits[split_name] = split.take([i for i in range(len(split)) if i not in unknown_set])
        if not len(splits[split_name]):
            raise DataError(f"dataset {spec.name!r} split {split_name!r}: all {len(split)} rows carry labels that "
                            f"train never has (e.g. {split.labels[0]!r}; train has {label_names}): the label "
                            f"names differ between splits; fix the data. Nothing was extracted")
    for split_name, split in splits.items():
        duplicates = [i for i, c in Counter(split.ids).items() if c > 1]
        if duplicates:
            raise DataError(f"dataset {spec.name!r} split {split_name!r} has duplicate ids, e.g. {duplicates[:3]}; "
                            f"ids must be unique (set datasets.{spec.name}.id_column or fix the data)")
    caps = _cap(splits, settings.max_rows, settings.seed)
    meta = {
        "name": spec.name, "source": source, "label_names": label_names, "carve": carve, "dropped": dropped,
        "rows": {s: len(v) for s, v in splits.items()},
        "sha256": {s: sha256_rows(v.texts, v.labels) for s, v in splits.items()},
        **({"caps": caps} if caps else {}), **({"resplit": resplit} if resplit else {}),
    }
    return Corpus(spec.name, splits, label_names, meta)


def write_corpus(corpus: Corpus, folder: Path) -> None:
    """Write the normalised splits and meta.json; each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for split_name, split in corpus.splits.items():
        lines = (json.dumps({"id": i, "text": t, "label": l, "source_split": s, "source_index": x},
                            ensure_ascii=False)
                 for i, t, l, s, x in zip(split.ids, split.texts, split.labels, split.source_split,
                                          split.source_index))
        write_text_atomic(folder / f"{split_name}.jsonl", "\n".join(lines) + "\n")
    write_json_atomic(folder / "meta.json", corpus.meta)


def read_corpus(folder: Path) -> Corpus:
    """Read a normalised copy written by write_corpus."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"no prepared corpus at {folder}: run `dvc repro` (stage prepare_data) first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    splits = {}
    for split_name in SPLIT_ORDER:
        path = folder / f"{split_name}.jsonl"
        if split_name not in meta["rows"]:
            continue
        # split on "\n" only: str.splitlines() also splits inside texts on U+0085, U+2028, U+2029, \x1c-\x1e...
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
        splits[split_name] = Split([r["id"] for r in rows], [r["text"] for r in rows], [r["label"] for r in rows],
                                   [r["source_split"] for r in rows], [r["source_index"] for r in rows])
        if sha256_rows(splits[split_name].texts, splits[split_name].labels) != meta["sha256"][split_name]:
            raise DataError(f"{path} does not match the sha256 in {meta_path}: rerun stage prepare_data")
    return Corpus(meta["name"], splits, meta["label_names"], meta)
