"""Export a trained head as a self-contained classifier folder that `predict` loads anywhere.

  export.json   dataset, row, head, seed, label names, inputs (model, pooling, layer), fusion groups,
                per model: weights/tokenizer sha256, layer count, max_len, compute and stored dtypes;
                and the sha256 of every other file of the folder, checked by `predict --from-export`
  head/         model.safetensors, standardisation.safetensors (train mean/std), config.json
  models/<m>/   the safetensors folder of each model the head reads (only those), with its tokenizer
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from pipeline.core.atomic import write_json_atomic
from pipeline.core.errors import OutputError, PipelineError
from pipeline.core.fingerprint import package_versions
from pipeline.sources.models import SOURCE_FILE, TOKENIZER_FILES
from pipeline.heads.predict import Predictor


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def export(predictor: Predictor, out: Path, dataset: str) -> Path:
    """Write the folder (built aside, then renamed: a killed export leaves no half folder); a place that
    cannot be written (no permission, a regular file on the path, a full disk) is an OutputError."""
    out = Path(out)
    build = out.with_name(f".{out.name}.partial")
    try:
        if out.exists():
            raise PipelineError(f"{out} exists; choose a new folder or remove it")
        if build.exists():
            shutil.rmtree(build)
        _write(predictor, build, dataset)
        build.rename(out)
    except OSError as error:
        shutil.rmtree(build, ignore_errors=True)
        raise OutputError(f"cannot export to {out}: {error.strerror or error} ({error.filename}); "
                          f"choose a new folder in a writable directory") from error
    return out


def _write(predictor: Predictor, build: Path, dataset: str) -> None:
    """The export's files, into `build`."""
    for name in ("model.safetensors", "config.json", predictor.config["standardisation"]):
        _copy(predictor.head_dir / name, build / "head" / name)
    for name, use in predictor.uses.items():
        for item in use.folder.iterdir():
            if item.suffix == ".safetensors" or item.name in TOKENIZER_FILES + (SOURCE_FILE, "config.json",
                                                                                "generation_config.json"):
                _copy(item, build / "models" / name / item.name)
    manifest = {
        "format": "layerfuse.classifier/1", "dataset": dataset, "row": predictor.config["row"],
        "head": predictor.config["head"], "seed": predictor.config["seed"],
        "label_names": predictor.label_names, "inputs": predictor.config["inputs"],
        "groups": predictor.config["groups"], "validation": predictor.config["validation"],
        "test": predictor.config["test"],
        "models": {name: use.as_dict() | {"source": json.loads((use.folder / SOURCE_FILE).read_text())["spec"]}
                   for name, use in predictor.uses.items()},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": package_versions(),
        "files_sha256": {str(path.relative_to(build)): hashlib.sha256(path.read_bytes()).hexdigest()
                         for path in sorted(build.rglob("*")) if path.is_file()},
    }
    write_json_atomic(build / "export.json", manifest)
