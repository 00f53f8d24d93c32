"""Pooling against hand computations, padding on either side, special tokens, batch invariance."""

import numpy as np
import pytest
import torch

from pipeline.extract.forward import PoolingSpec, pool_batch
from pipeline.hidden_states.layer_tap import run_with_layers
from pipeline.hidden_states.pooling import pool

NAMES = ["mean", "last", "first", "max", "mean_nospecial"]


def hand_case(padding_side: str):
    """Two texts: 3 real tokens (first and last special) and 2 real tokens, padded to width 4."""
    a = torch.tensor([[1.0, 10.0], [2.0, -20.0], [3.0, 30.0]])
    b = torch.tensor([[5.0, 5.0], [7.0, -1.0]])
    hidden = torch.full((2, 4, 2), 99.0)     # padding holds garbage on purpose
    mask = torch.zeros(2, 4, dtype=torch.bool)
    special = torch.zeros(2, 4, dtype=torch.bool)
    for row, (states, specials) in enumerate([(a, [1, 0, 1]), (b, [0, 0])]):
        n = len(states)
        span = slice(0, n) if padding_side == "right" else slice(4 - n, 4)
        hidden[row, span] = states
        mask[row, span] = True
        special[row, span] = torch.tensor(specials, dtype=torch.bool)
    return hidden, mask, mask & ~special


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pooling_matches_hand_computation(padding_side):
    hidden, mask, content = hand_case(padding_side)
    before = hidden.clone()
    out = pool(hidden, mask, content, NAMES)
    assert torch.equal(hidden, before), "pooling wrote into the model's float32 states"   # they are read in place
    expected = {
        "mean": [[2.0, 20.0 / 3], [6.0, 2.0]],
        "last": [[3.0, 30.0], [7.0, -1.0]],
        "first": [[1.0, 10.0], [5.0, 5.0]],
        "max": [[3.0, 30.0], [7.0, 5.0]],
        "mean_nospecial": [[2.0, -20.0], [6.0, 2.0]],   # row 0: only the middle token is not special
    }
    for name, values in expected.items():
        assert out[name].dtype == torch.float32
        torch.testing.assert_close(out[name], torch.tensor(values), msg=f"{name} ({padding_side} padding)")


def test_mean_nospecial_falls_back_when_everything_is_special():
    hidden = torch.tensor([[[1.0], [3.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = pool(hidden, mask, torch.zeros_like(mask), ["mean_nospecial"])
    torch.testing.assert_close(out["mean_nospecial"], torch.tensor([[2.0]]))


def test_bf16_mean_sums_in_float32():
    hidden = torch.full((1, 4096, 1), 1.001, dtype=torch.bfloat16)
    out = pool(hidden, torch.ones(1, 4096, dtype=torch.bool), torch.ones(1, 4096, dtype=torch.bool), ["mean"])
    assert abs(out["mean"].item() - hidden[0, 0, 0].float().item()) < 1e-6


def _load(prepared_models, name):
    from pipeline.config.sections import ModelSpec
    from pipeline.sources.models import load_model
    return load_model(prepared_models / "models" / name, ModelSpec(name=name, source="local", path="."), "cpu",
                      torch.float32)


@pytest.mark.parametrize("name", [pytest.param("minilm-l6", marks=pytest.mark.slow), "tiny-llama"])   # slow: a real model
def test_layer_tap_matches_output_hidden_states(prepared_models, name):
    model, tokenizer = _load(prepared_models, name)
    inputs = tokenizer(["a short text", "and a somewhat longer second text here"], padding=True, return_tensors="pt")
    seen = {}
    with torch.inference_mode():
        reference = model(**inputs, output_hidden_states=True).hidden_states
        run_with_layers(model, dict(inputs), lambda i, h: seen.__setitem__(i, h.clone()))
    assert sorted(seen) == list(range(len(reference)))
    for index, states in enumerate(reference):
        torch.testing.assert_close(seen[index], states, msg=f"layer {index}")


@pytest.mark.parametrize("name", [pytest.param("minilm-l6", marks=pytest.mark.slow), "tiny-llama"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_vector_does_not_depend_on_batch_or_padding(prepared_models, name, padding_side):
    model, tokenizer = _load(prepared_models, name)
    settings = PoolingSpec(poolings=tuple(NAMES), max_len=64, padding_side=padding_side)
    layers = model.config.num_hidden_layers + 1
    text = "the movie is amateurish , but it's a minor treat ."
    alone, _ = pool_batch(model, tokenizer, [text], settings, torch.device("cpu"), layers)
    crowd = ["a much longer neighbour " * 6, text, "short"]
    together, _ = pool_batch(model, tokenizer, crowd, settings, torch.device("cpu"), layers)
    for pooling in NAMES:
        np.testing.assert_allclose(together[pooling][1], alone[pooling][0], rtol=1e-4, atol=1e-4,
                                   err_msg=f"{name} {pooling} {padding_side}")


def test_stop_after_skips_later_blocks(prepared_models):
    model, tokenizer = _load(prepared_models, "tiny-llama")
    seen = []
    with torch.inference_mode():
        run_with_layers(model, dict(tokenizer(["hello"], return_tensors="pt")), lambda i, h: seen.append(i),
                        stop_after=1)
    assert seen == [0, 1]


def test_pooling_fewer_layers_gives_the_first_layers_of_the_full_pass(prepared_models):
    """predict pools only up to the deepest layer its head reads: the same numbers as the full pass."""
    model, tokenizer = _load(prepared_models, "tiny-llama")
    spec = PoolingSpec(poolings=("mean", "last"), max_len=32)
    texts = ["a short text", "and a somewhat longer second text here"]
    layers = model.config.num_hidden_layers + 1
    full, tokens = pool_batch(model, tokenizer, texts, spec, torch.device("cpu"), layers)
    part, _ = pool_batch(model, tokenizer, texts, spec, torch.device("cpu"), 2)
    assert full["mean"].shape[1] == layers and part["mean"].shape[1] == 2 and tokens > 0
    for pooling in spec.poolings:
        np.testing.assert_array_equal(part[pooling], full[pooling][:, :2])
    with pytest.raises(ValueError, match="num_layers"):
        pool_batch(model, tokenizer, texts, spec, torch.device("cpu"), layers + 1)
