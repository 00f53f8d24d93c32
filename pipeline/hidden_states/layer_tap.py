"""Hand every layer's token states to a callback as the forward pass produces them.

Layer 0 is the embedding output (the first block's input); layer i is block i's output; the last
layer is the model's `last_hidden_state` (after the final norm where the model has one). This is
the convention of transformers' `output_hidden_states`, without keeping all layers alive at once.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline.core.errors import UnsupportedModelError


class _Stop(Exception):
    """Raised inside a hook to skip the blocks after the deepest layer anyone needs."""


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks in the order they run: the ModuleList as long as the config's layer count,
    or, where blocks share weights (ALBERT: `num_hidden_groups` groups, run `num_hidden_layers` times in
    turn), the ModuleList of those groups. A block's k-th run overall produces layer k."""
    config = text_config(model.config)
    count = config.num_hidden_layers
    groups = getattr(config, "num_hidden_groups", None)
    for size in (count, groups) if groups and groups != count else (count,):
        for module in model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == size:
                return module
    raise UnsupportedModelError(f"cannot find the {count} transformer blocks of {type(model).__name__}: no ModuleList of "
                    f"{count} blocks (nor of shared block groups); this model family is not supported")


def run_with_layers(model: nn.Module, inputs: dict[str, torch.Tensor],
                    on_layer: Callable[[int, torch.Tensor], None], stop_after: int | None = None) -> None:
    """Run `model(**inputs)` calling `on_layer(index, hidden)` for layers 0..L (or 0..stop_after).

    Block runs are counted, not blocks: shared blocks (ALBERT) run several times and give a layer each."""
    blocks = find_blocks(model)
    last = text_config(model.config).num_hidden_layers
    stop_after = last if stop_after is None else stop_after
    if not 0 <= stop_after <= last:
        raise ValueError(f"stop_after must lie in 0..{last}, got {stop_after}")
    runs = 0

    def before_block(module, args, kwargs):
        if runs == 0:
            on_layer(0, args[0] if args else kwargs["hidden_states"])
            if stop_after == 0:
                raise _Stop

    def after_block(module, args, output):
        nonlocal runs
        runs += 1
        if runs < last:                        # the last layer comes from last_hidden_state below
            on_layer(runs, output[0] if isinstance(output, (tuple, list)) else output)
            if runs == stop_after:
                raise _Stop

    distinct = list({id(block): block for block in blocks}.values())
    handles = [block.register_forward_pre_hook(before_block, with_kwargs=True) for block in distinct]
    handles += [block.register_forward_hook(after_block) for block in distinct]
    try:
        output = model(**inputs)
        on_layer(last, output.last_hidden_state)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
