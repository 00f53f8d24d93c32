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
    """All requested poolings of the layers of one batch, fused: the same numbers as POOLINGS above.

    What depends only on the batch (mean weights and counts, first/last token indices, the padding
    mask) is computed once per batch, not once per layer. `pool_layers` pools a group of layers with one
    op per pooling kind, not one per layer: the group is stacked into one float32 tensor (the copy `max`
    masks in place), `mean` and `mean_nospecial` are one batched matrix product over it (float32 sums),
    `max` one masked reduction, `first`/`last` one gather each. Nothing syncs with the host, so on a GPU
    the whole batch is copied to the host once. `__call__` pools one layer the same way and never
    writes the model's own tensors.
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

    def _pool(self, states: torch.Tensor, floor: float, owned: bool) -> dict[str, torch.Tensor]:
        """Poolings of float32 states [G, B, T, D] -> [G, B, D] each; `owned`: `max` may overwrite them."""
        result = {}
        if self.means:
            sums = torch.matmul(self.weights, states)             # [G, B, k, D], summed in float32
            for i, name in enumerate(self.means):
                result[name] = sums[:, :, i] / self.counts[:, i]
        if "last" in self.names:
            result["last"] = states[:, self.rows, self.last_index]
        if "first" in self.names:
            result["first"] = states[:, self.rows, self.first_index]
        if "max" in self.names:                                   # fills padding with the states' dtype's floor
            filled = states.masked_fill_(self.padding, floor) if owned else states.masked_fill(self.padding, floor)
            result["max"] = filled.amax(dim=2)
        return result

    def pool_layers(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """A group of layers' states ([B, T, D] each, any float dtype) -> [len(names), B, len(layers), D] float32."""
        states = torch.empty((len(layers), *layers[0].shape), dtype=torch.float32, device=layers[0].device)
        for i, hidden in enumerate(layers):                       # one float32 copy of the group, whatever the
            states[i].copy_(hidden)                               # dtype: ours to overwrite
        result = self._pool(states, torch.finfo(layers[0].dtype).min, owned=True)
        return torch.stack([result[name] for name in self.names]).transpose(1, 2)

    def __call__(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """One layer [B, T, D] -> {name: [B, D] float32}; float32 states are read where they are."""
        states = hidden.unsqueeze(0).to(torch.float32)
        result = self._pool(states, torch.finfo(hidden.dtype).min, owned=hidden.dtype != torch.float32)
        return {name: result[name][0] for name in self.names}


def pool(hidden: torch.Tensor, mask: torch.Tensor, content: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """All requested poolings of one layer at once (the fused LayerPooler)."""
    return LayerPooler(mask, content, names)(hidden)
