"""Pool one layer's token states [B, T, D] into sentence vectors [B, D], in float32.

`mask` marks real tokens (padding on either side is fine); `content` marks real tokens that are
not special (BOS/EOS/CLS/SEP). Each function only looks at its own rows' real tokens, so a text's
vector does not depend on its batch-mates or on how much padding it got.
"""

from __future__ import annotations

import torch


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(torch.float32).unsqueeze(-1)
    total = torch.einsum("btd,bt->bd", hidden.float(), weights.squeeze(-1))   # sums in float32
    return total / weights.sum(dim=1).clamp(min=1.0)


def mean(hidden: torch.Tensor, mask: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Average over real tokens."""
    return _masked_mean(hidden, mask)


def last(hidden: torch.Tensor, mask: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The last real token: a decoder's natural sentence vector (it has seen the whole text)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    index = torch.where(mask, positions, -1).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()


def first(hidden: torch.Tensor, mask: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The first real token: CLS for BERT-style encoders."""
    index = mask.to(torch.int8).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()


def max(hidden: torch.Tensor, mask: torch.Tensor, content: torch.Tensor) -> torch.Tensor:  # noqa: A001
    """Element-wise maximum over real tokens."""
    floor = torch.finfo(hidden.dtype).min
    return hidden.masked_fill(~mask.unsqueeze(-1), floor).amax(dim=1).float()


def mean_nospecial(hidden: torch.Tensor, mask: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Average over real non-special tokens; decoders' BOS carries huge activations that swamp `mean`.

    A text made only of special tokens falls back to `mean` so that no row is ever empty.
    """
    has_content = content.any(dim=1, keepdim=True)
    return _masked_mean(hidden, torch.where(has_content, content, mask))


POOLINGS = {
    "mean": mean,
    "last": last,
    "first": first,
    "max": max,
    "mean_nospecial": mean_nospecial,
}


def pool(hidden: torch.Tensor, mask: torch.Tensor, content: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """All requested poolings of one layer at once."""
    return {name: POOLINGS[name](hidden, mask, content) for name in names}
