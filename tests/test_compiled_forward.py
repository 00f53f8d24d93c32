"""The compiled forward (pipeline/extract/compiled_forward.py) against the eager one, on tiny random models.

Reference: layer_tap.run_with_layers + LayerPooler, the eager path's own pieces (layer 0 = embedding
output, i = block i's output, last = last_hidden_state). Compilation runs for real (inductor + the C
compiler); the tests are skipped only where inductor cannot run (no C compiler).
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from pipeline.extract import compiled_forward
from pipeline.extract.compiled_forward import CompiledForward, CompiledForwardError, resolve_forward
from pipeline.hidden_states.layer_tap import run_with_layers
from pipeline.hidden_states.pooling import POOLINGS, LayerPooler

needs_compiler = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                    reason="inductor needs a C compiler (gcc/cc) on PATH")
POOLS = list(POOLINGS)


def tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return LlamaModel(config).to(dtype).eval()


def tiny_bert(dtype):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
    return BertModel(config).to(dtype).eval()


def batch(lengths: list[int], seed: int = 0) -> SimpleNamespace:
    """Right-padded random ids; the first and last real tokens count as special (as CLS/SEP would)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 97, (n,), generator=generator)
        mask[row, :n] = True
    content = mask.clone()
    for row, n in enumerate(lengths):
        content[row, 0] = content[row, n - 1] = False
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return SimpleNamespace(inputs={"input_ids": ids, "attention_mask": mask.long(), "position_ids": positions},
                           mask=mask, content=content, tokens=int(mask.sum()))


def eager_reference(model, encoded, num_layers: int) -> torch.Tensor:
    total = len(model.layers if hasattr(model, "layers") else model.encoder.layer) + 1
    out = torch.empty((len(POOLS), encoded.mask.shape[0], num_layers, model.config.hidden_size))
    with torch.inference_mode():
        pooler = LayerPooler(encoded.mask, encoded.content, POOLS)

        def on_layer(i, h):
            for k, values in enumerate(pooler(h).values()):
                out[k, :, i] = values

        run_with_layers(model, encoded.inputs, on_layer, stop_after=None if num_layers == total else num_layers - 1)
    return out


@pytest.fixture
def compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled_forward.CACHE_ENV, str(tmp_path / "compile_cache"))
    torch._dynamo.reset()
    yield tmp_path / "compile_cache"
    torch._dynamo.reset()


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_compiled_matches_eager_in_float32_and_one_compile_serves_every_shape(family, compile_cache):
    model = (tiny_llama if family == "llama" else tiny_bert)(torch.float32)
    num_layers = model.config.num_hidden_layers + 1
    forward = CompiledForward()
    for seed, lengths in enumerate([[5, 9, 3, 7], [12, 4, 8], [6, 6, 2, 11, 3]]):   # batch and width vary
        encoded = batch(lengths, seed)
        got = forward(model, encoded, POOLS, num_layers)
        want = eager_reference(model, encoded, num_layers)
        assert got.shape == want.shape == (len(POOLS), len(lengths), num_layers, model.config.hidden_size)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert forward.calls == 3
    assert forward.compiling_calls == 1, "a new batch shape recompiled: dynamic shapes are not in effect"
    assert forward.compile_seconds > 0
    assert any(compile_cache.rglob("*")), "nothing was written to the compile cache"


@needs_compiler
@pytest.mark.slow
def test_compiled_matches_eager_in_bfloat16_within_bf16_rounding(compile_cache):
    model = tiny_llama(torch.bfloat16)
    encoded = batch([5, 9, 3, 7])
    got = CompiledForward()(model, encoded, POOLS, 4)
    want = eager_reference(model, encoded, 4)
    exact = eager_reference(tiny_llama(torch.float32), encoded, 4)
    # compiled bf16 is as close to the float32 truth as eager bf16 is (inductor fuses, so roundings differ)
    scale = exact.abs().amax()
    assert (got - exact).abs().amax() / scale < 0.03
    assert (got - exact).abs().amax() <= 2 * (want - exact).abs().amax() + 1e-3 * scale
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(scale))


@needs_compiler
@pytest.mark.slow
def test_compiled_stops_after_the_deepest_layer_asked_for(compile_cache):
    model = tiny_llama(torch.float32)
    encoded = batch([4, 7])
    got = CompiledForward()(model, encoded, ["mean", "last"], 2)
    full = eager_reference(model, encoded, 2)[[POOLS.index("mean"), POOLS.index("last")]]
    assert got.shape == (2, 2, 2, 32)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_layers must lie in 1..4"):
        CompiledForward()(model, encoded, ["mean"], 5)


def test_resolve_forward_settings():
    assert resolve_forward("eager", "cpu") == "eager"
    assert resolve_forward("compiled", "cpu") == "compiled"
    assert resolve_forward("auto", "cpu") == ("compiled" if compiled_forward.AUTO_COMPILED_ON["cpu"] else "eager")
    assert resolve_forward("auto", "cuda") == ("compiled" if compiled_forward.AUTO_COMPILED_ON["cuda"] else "eager")
    with pytest.raises(ValueError, match="unknown forward 'fast'"):
        resolve_forward("fast", "cpu")


def test_compiled_refuses_an_unsupported_family_by_name():
    from transformers import MPNetConfig, MPNetModel
    model = MPNetModel(MPNetConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4)).eval()
    with pytest.raises(CompiledForwardError, match="'mpnet'"):
        resolve_forward("compiled", "cpu", model)
    assert resolve_forward("auto", "cpu", model) == "eager"
    with pytest.raises(CompiledForwardError, match="'mpnet' is not supported"):
        CompiledForward()(model, batch([3, 4]), ["mean"], 2)


def test_use_compile_cache_keeps_a_user_choice(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled_forward.CACHE_ENV, "-")    # records the variable's state, so what the code under
    monkeypatch.delenv(compiled_forward.CACHE_ENV)         # test sets is undone after the test, not left to the next
    assert compiled_forward.use_compile_cache(tmp_path / "a") == (tmp_path / "a").resolve()
    assert (tmp_path / "a").is_dir() and compiled_forward.cache_dir() == (tmp_path / "a").resolve()
    assert compiled_forward.use_compile_cache(tmp_path / "b") == (tmp_path / "a").resolve()
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv(compiled_forward.CACHE_ENV, default_cache_dir())     # inductor's own default: no choice
    assert compiled_forward.use_compile_cache(tmp_path / "c") == (tmp_path / "c").resolve()


def test_extract_forward_setting_parses_and_refuses_a_typo(tmp_path):
    import yaml

    from conftest import registry
    from pipeline.config.params import load_params
    from pipeline.core.errors import PipelineError
    raw = registry()
    raw["paths"] = {"store": str(tmp_path / "store"), "data_mirror": str(tmp_path)}
    raw["extract"]["forward"] = "compiled"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path).extract.forward == "compiled"
    raw["extract"]["forward"] = "compield"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineError, match="extract.forward"):
        load_params(path)


@needs_compiler
@pytest.mark.slow
def test_compiled_extraction_matches_eager_store_and_is_fingerprinted(mr_slice, make_params, prepared_models,
                                                                      tmp_path, monkeypatch):
    """extract.forward: compiled through the real driver: the same stored numbers as eager (float32 compute,
    float16 storage), `forward: compiled` in the fingerprint (an eager store has no such key, as before),
    a store of the other kind refused, and the compiled code cached under the store."""
    from conftest import link_prepared, tiny_llama_entry
    from pipeline.config.params import load_params
    from pipeline.sources.corpora import build_corpus, write_corpus
    from pipeline.core.errors import StoreMismatchError
    from pipeline.extract.driver import extract
    from pipeline.store.reader import open_store
    monkeypatch.setenv(compiled_forward.CACHE_ENV, "-")    # records the variable's state, so what the code under
    monkeypatch.delenv(compiled_forward.CACHE_ENV)         # test sets is undone after the test, not left to the next
    torch._dynamo.reset()

    def params_for(forward: str, folder: str):
        path = make_params(mr_slice, ["tiny-llama"], ["mrslice"], folder=tmp_path / folder,
                           extract={"forward": forward, "compute_dtype": "float32"},
                           extra_models=tiny_llama_entry(prepared_models))
        params = load_params(path)
        write_corpus(build_corpus(params.dataset("mrslice"), params.data_mirror, params.data),
                     params.data_dir("mrslice"))
        link_prepared(prepared_models, params.store, ["tiny-llama"])
        return params

    eager, compiled = params_for("eager", "eager"), params_for("compiled", "compiled")
    extract(eager, "tiny-llama", "mrslice", show_progress=False)
    extract(compiled, "tiny-llama", "mrslice", show_progress=False)
    a, b = open_store(eager.embeddings_root, "tiny-llama", "mrslice"), open_store(compiled.embeddings_root, "tiny-llama", "mrslice")
    assert "forward" not in a.attrs["fingerprint"]["extract"]
    assert b.attrs["fingerprint"]["extract"]["forward"] == "compiled"
    for split in ("train", "test"):
        for pooling in POOLS:
            x, y = a.root[split][pooling][:].astype("float32"), b.root[split][pooling][:].astype("float32")
            assert x.shape == y.shape and x.shape[1] == 4
            np_scale = float(abs(x).max())
            torch.testing.assert_close(torch.from_numpy(y), torch.from_numpy(x), rtol=2e-3, atol=2e-3 * np_scale)
    assert any((compiled.store / "compile_cache").rglob("*")), "compiled code was not cached under the store"
    mixed = params_for("compiled", "eager")           # compiled settings against the eager store
    with pytest.raises(StoreMismatchError, match=r"extract\.forward"):
        extract(mixed, "tiny-llama", "mrslice", show_progress=False)
