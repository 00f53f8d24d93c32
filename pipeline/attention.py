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
