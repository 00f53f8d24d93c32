"""Hand every layer's token states to a callback as the forward pass produces them.

Layer 0 is the embedding output (the first block's input); layer i is block i's output; the last
layer is the model's `last_hidden_state` (after the final norm where the model has one). This is
the convention of transformers' `output_hidden_states`, without keeping all layers alive at once.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _Stop(Exception):
    """Raised inside a hook to skip the blocks after the deepest layer anyone needs."""


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the ModuleList as long as the config's layer count."""
    count = text_config(model.config).num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise TypeError(f"cannot find the {count} transformer blocks of {type(model).__name__}")


def run_with_layers(model: nn.Module, inputs: dict[str, torch.Tensor],
                    on_layer: Callable[[int, torch.Tensor], None], stop_after: int | None = None) -> None:
    """Run `model(**inputs)` calling `on_layer(index, hidden)` for layers 0..L (or 0..stop_after)."""
    blocks = find_blocks(model)
    last = len(blocks)
    stop_after = last if stop_after is None else stop_after
    if not 0 <= stop_after <= last:
        raise ValueError(f"stop_after must lie in 0..{last}, got {stop_after}")

    def before_first(module, args, kwargs):
        on_layer(0, args[0] if args else kwargs["hidden_states"])
        if stop_after == 0:
            raise _Stop

    def after_block(index: int):
        def hook(module, args, output):
            if index < last:                   # the last layer comes from last_hidden_state below
                on_layer(index, output[0] if isinstance(output, (tuple, list)) else output)
            if index == stop_after:
                raise _Stop
        return hook

    handles = [blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [block.register_forward_hook(after_block(i + 1)) for i, block in enumerate(blocks)
                if i + 1 < last and i + 1 <= stop_after]
    try:
        output = model(**inputs)
        on_layer(last, output.last_hidden_state)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
