"""Which attention kernel extraction runs: the fastest for the batch at hand, chosen per batch.

`python -m pipeline.bench attention` measures it: on this project's 2-core CPU (bf16), transformers'
eager attention (two batched matmuls and a softmax) made SmolLM2's whole forward pass 4-12% faster
than torch's fused SDPA kernel on short texts (MR: ~27 tokens), whose per-call overhead dominates
there; on long texts (R8: ~115 tokens) eager was up to ~7% slower. `auto` therefore runs eager
attention on CPU batches padded to at most SHORT_WIDTH tokens and SDPA otherwise (always SDPA on
GPUs). The choice depends only on a batch's padded width, which depends only on its block's rows, so
a resumed store stays bit-identical; the setting is part of the store's fingerprint because the two
kernels round differently in bf16.
"""

from __future__ import annotations

import sys

import torch

from pipeline.core.errors import PipelineError

ATTENTIONS = ("auto", "sdpa", "eager")
TRANSFORMERS_DEFAULT = "sdpa"   # what hand-written loops get, and what stores from before this setting ran
SHORT_WIDTH = 64
AUTO = "layerfuse_auto"
_sdpa = None                    # transformers' SDPA attention function, bound by _register()


def _auto_attention(module, query, key, value, attention_mask, **kwargs):
    """Short CPU batches: the model's own eager attention (its modeling file's, so grouped KV heads,
    soft-capping and the like stay the model's); everything else: SDPA."""
    if query.device.type == "cpu" and query.shape[-2] <= SHORT_WIDTH:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager(module, query, key, value, attention_mask, **kwargs)
    return _sdpa(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    """Make `layerfuse_auto` a transformers attention implementation (idempotent).

    Its mask is the additive float mask of eager attention, which SDPA accepts as well.
    """
    global _sdpa
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    _sdpa = sdpa_attention_forward
    AttentionInterface.register(AUTO, _auto_attention)
    AttentionMaskInterface.register(AUTO, eager_mask)


def implementation(name: str, device: torch.device | str) -> str:
    """The transformers attn_implementation for an `extract.attention` setting on this device."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}: one of {', '.join(ATTENTIONS)}")
    if name != "auto":
        return name
    if torch.device(device).type != "cpu":
        return "sdpa"
    _register()
    return AUTO


def use_attention(model, name: str, device: torch.device | str) -> None:
    """Switch a loaded model to the attention `name` asks for.

    Models whose code does not go through transformers' attention interface (MPNet, some remote
    code) refuse the switch and keep their own attention, which the setting then maps to as well.
    """
    wanted = implementation(name, device)
    if wanted == getattr(model.config, "_attn_implementation", None):
        return
    try:
        model.set_attn_implementation(wanted)
    except (ValueError, ImportError, AttributeError):
        pass


# -- attention entropy ---------------------------------------------------------------------------------
ENTROPY = "layerfuse_entropy"
_per_query: list[torch.Tensor] | None = None   # one [B, T] per attention call of the forward pass running


def _entropy_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention (the only kernel that yields probabilities); on the way, each
    query's entropy over its key distribution (nats, float32, heads averaged) is collected."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise TypeError(f"{type(module).__name__} has no eager attention to compute attention entropy with")
    output, weights = eager(module, query, key, value, attention_mask, **kwargs)
    if _per_query is not None:
        _per_query.append(torch.special.entr(weights.float()).sum(dim=-1).mean(dim=1))   # [B, H, Tq] -> [B, Tq]
    return output, weights


def _register_entropy() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(ENTROPY, _entropy_attention)
    AttentionMaskInterface.register(ENTROPY, eager_mask)


def entropy_supported(config) -> bool:
    """Whether the model class this config loads as routes its attention through transformers'
    AttentionInterface (Llama, BERT, Gemma 3: yes; MPNet: no), where the entropy pass hooks in."""
    from transformers import AutoModel
    model_class = AutoModel._model_mapping.get(type(config), None)
    return bool(getattr(model_class, "_supports_attention_backend", False))


def attention_entropy(model, inputs: dict[str, torch.Tensor], mask: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[B, num_blocks] float32 on the device: per text and block, the mean over its real query tokens
    (mask) of the entropy of each query's attention distribution (padding keys carry no probability;
    decoders' is the causal one), heads averaged. One eager forward pass; the model's own attention
    setting is restored afterwards."""
    global _per_query
    _register_entropy()
    before = model.config._attn_implementation
    _per_query = []
    try:
        try:
            model.set_attn_implementation(ENTROPY)
        except (ValueError, ImportError, AttributeError) as error:
            raise PipelineError(f"{type(model).__name__} cannot run eager attention with probabilities ({error}); "
                                f"attention entropy cannot be computed for it: set extract.attention_entropy_rows: 0") from error
        with torch.inference_mode():
            model(**inputs)
        collected = _per_query
    finally:
        _per_query = None
        model.set_attn_implementation(before)
    if len(collected) != num_blocks:
        raise PipelineError(f"{type(model).__name__}: {len(collected)} attention calls went through transformers' "
                        f"attention interface, expected {num_blocks}; attention entropy cannot be computed for "
                        f"this model (set extract.attention_entropy_rows: 0)")
    weights = mask.to(torch.float32)
    per_block = torch.stack(collected, dim=1)                                  # [B, blocks, T]
    return (per_block * weights[:, None, :]).sum(dim=2) / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
