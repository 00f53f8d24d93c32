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


class LayerPooler:
    """All requested poolings of every layer of one batch, fused: the same numbers as POOLINGS above.

    What depends only on the batch (mean weights and counts, first/last token indices, the padding
    mask) is computed once per batch, not once per layer. Per layer there is one float32 copy of the
    states; `mean` and `mean_nospecial` are one batched matrix product over it (float32 sums), `max`
    masks that copy in place and reduces it, `first`/`last` gather two rows. Results land in `out`
    without host syncs, so on a GPU the whole batch is copied to the host once.
    """

    def __init__(self, mask: torch.Tensor, content: torch.Tensor, names):
        self.names = list(names)
        unknown = [n for n in self.names if n not in POOLINGS]
        if unknown:
            raise KeyError(f"unknown pooling(s) {unknown}; known: {sorted(POOLINGS)}")
        rows = torch.arange(mask.shape[0], device=mask.device)
        self.rows = rows
        self.means = [n for n in self.names if n in ("mean", "mean_nospecial")]
        if self.means:
            has_content = content.any(dim=1, keepdim=True)
            weights = [mask if n == "mean" else torch.where(has_content, content, mask) for n in self.means]
            self.weights = torch.stack(weights, dim=1).to(torch.float32)                   # [B, k, T]
            self.counts = self.weights.sum(dim=2, keepdim=True).clamp(min=1.0)              # [B, k, 1]
        if "last" in self.names:
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            self.last_index = torch.where(mask, positions, -1).argmax(dim=1)
        if "first" in self.names:
            self.first_index = mask.to(torch.int8).argmax(dim=1)
        if "max" in self.names:
            self.padding = ~mask.unsqueeze(-1)

    def __call__(self, hidden: torch.Tensor, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Pool one layer [B, T, D]; write into out[name] ([B, D] views) when given, else return new tensors."""
        result = {}
        if self.means or "max" in self.names:
            states = hidden.to(torch.float32, copy=True)      # our own copy: `max` may overwrite it
            if self.means:
                sums = torch.bmm(self.weights, states)          # [B, k, D], summed in float32
                for i, name in enumerate(self.means):
                    result[name] = sums[:, i] / self.counts[:, i]
            if "max" in self.names:
                floor = torch.finfo(hidden.dtype).min           # what `max` fills with: same numbers
                result["max"] = states.masked_fill_(self.padding, floor).amax(dim=1)
        if "last" in self.names:
            result["last"] = hidden[self.rows, self.last_index].float()
        if "first" in self.names:
            result["first"] = hidden[self.rows, self.first_index].float()
        if out is None:
            return {name: result[name] for name in self.names}
        for name in self.names:
            out[name].copy_(result[name])
        return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, content: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """All requested poolings of one layer at once (the fused LayerPooler)."""
    return LayerPooler(mask, content, names)(hidden)
