"""Extraction's forward pass compiled by torch.compile (inductor), every layer pooled inside the graph.

Why: Hugging Face's eager forward spends its time in many small kernels between the matmuls (norms,
rotary embeddings, residual adds, casts); inductor fuses them, and fuses each layer's pooling into
the block that produced it, so no hidden state leaves its cache just to be pooled.

How, without module hooks inside the compiled region:
- The model's own forward runs eagerly up to its first block (embeddings, attention mask, rotary
  embeddings: cheap, and exactly the model's code), where a pre-hook records the block's inputs
  and stops it. Layer 0 (the embedding output) is pooled there, eagerly.
- One compiled function, `_block_and_pool`, runs one block and pools its output. Every block of a
  model has the same code, and the block's weights are inputs of the graph (dynamo inlines nn
  modules), so one compilation serves every block; dynamic=True lets it serve every batch shape.
- The last block's call also applies the final norm (Llama's `norm`; BERT has none) before pooling:
  layer_tap's convention (0 = embedding output, i = block i's output, last = last_hidden_state).

Compiled code is cached on disk (inductor's FX graph cache under `store/compile_cache`, see
use_compile_cache), so a machine pays the C++ compilation once; each process still traces once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config.sections import FORWARDS
from pipeline.core.errors import ConfigError
from pipeline.hidden_states.layer_tap import find_blocks, text_config
from pipeline.hidden_states.pooling import LayerPooler

# model_type -> the attribute holding the norm applied after the last block (None: there is none).
# Only families whose blocks all take the same inputs (one mask, one rotary table) are listed.
FINAL_NORM = {"llama": "norm", "bert": None}
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


class CompiledForwardError(ConfigError):
    """extract.forward: compiled asked of a model whose family it does not support (a clear stage error)."""


class _Captured(Exception):
    """Raised by the first block's pre-hook once its inputs are recorded: the eager forward stops there."""


def model_type(model) -> str:
    return text_config(model.config).model_type


def resolve_forward(name: str, device: torch.device | str, model=None) -> str:
    """'eager' or 'compiled' for an `extract.forward` setting on this device and model (a loaded
    model, or its config's model_type; None: unknown yet).

    auto: compiled where it was measured faster (see docs/benchmarks.md) and the model's family is
    supported; eager otherwise. compiled on an unsupported family is an error, never a silent eager run.
    """
    if name not in FORWARDS:
        raise ValueError(f"unknown forward {name!r}: one of {', '.join(FORWARDS)}")
    kind = model if model is None or isinstance(model, str) else model_type(model)
    if name == "compiled" and kind is not None and kind not in FINAL_NORM:
        raise CompiledForwardError(f"extract.forward: compiled supports model types {sorted(FINAL_NORM)}, not "
                                   f"{kind!r}; use eager or auto")
    if name != "auto":
        return name
    wanted = AUTO_COMPILED_ON.get(torch.device(device).type, False)
    return "compiled" if wanted and (kind is None or kind in FINAL_NORM) else "eager"


# Where `auto` compiles. CPU: measured no faster (`python -m pipeline.bench extraction --rows 128 --repeats 3
# --compute-dtype float32|bfloat16`, 2-core EPYC AVX512-BF16 under load: compiled / eager 0.91-1.04x in
# float32, ~0.96-0.99x in bf16), because the linear layers alone are ~72% of the eager time in float32 (the
# bench's bound), and compiling costs 5-140 s per process: eager. CUDA: not measured (no GPU was lent), so
# eager until someone measures it; extract.forward: compiled runs it anywhere.
AUTO_COMPILED_ON = {"cpu": False, "cuda": False}


def use_compile_cache(folder: Path | str) -> Path:
    """Point inductor's on-disk caches at `folder` (e.g. store/compile_cache) unless the user already
    chose one through TORCHINDUCTOR_CACHE_DIR (inductor writes its own /tmp default there on first use,
    and importing some libraries triggers that: the default is not a choice and is replaced)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    current = os.environ.get(CACHE_ENV)
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ[CACHE_ENV] = str(Path(folder).resolve())
    chosen = Path(os.environ[CACHE_ENV])
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def cache_dir() -> Path | None:
    """Where inductor caches compiled code in this process (None: not chosen yet, inductor's default)."""
    chosen = os.environ.get(CACHE_ENV)
    return Path(chosen) if chosen else None


_SHARED: "CompiledForward | None" = None


def shared() -> "CompiledForward":
    """This process's compiled forward: one compilation serves every model of a family, so it is shared."""
    global _SHARED
    if _SHARED is None:
        _SHARED = CompiledForward()
    return _SHARED


def _block_and_pool(block, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any], pooler: LayerPooler,
                    norm) -> tuple[torch.Tensor, torch.Tensor]:
    """One block, then every pooling of its output (after `norm` when given): [P, B, D] float32."""
    hidden = block(hidden, *args, **kwargs)
    if isinstance(hidden, (tuple, list)):
        hidden = hidden[0]
    pooled = pooler(norm(hidden) if norm is not None else hidden)
    return hidden, torch.stack([pooled[name] for name in pooler.names])


class CompiledForward:
    """The `(model, batch, poolings, num_layers) -> [P, B, layers, D] float32` step of the extraction
    driver, compiled. Keeps its own compile-time account: `compile_seconds` is the wall time of the
    calls that compiled something (the first one, and any recompilation), `calls` the calls made."""

    def __init__(self, dynamic: bool = True):
        self.step = torch.compile(_block_and_pool, dynamic=dynamic)
        # Variants a run can meet: with/without the final norm, batches of one row (dynamo specialises
        # sizes 0/1), and the `auto` attention's two kernels (widths <= / > 64): up to 8, dynamo's
        # default limit, past which it would silently run the function eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        self.compile_seconds = 0.0
        self.compiling_calls = 0
        self.calls = 0

    def __call__(self, model, batch, poolings, num_layers: int) -> torch.Tensor:
        before = _compilations()
        started = time.perf_counter()
        out = self.forward(model, batch, poolings, num_layers)
        self.calls += 1
        if _compilations() != before:
            self.compile_seconds += time.perf_counter() - started
            self.compiling_calls += 1
        return out

    def forward(self, model, batch, poolings, num_layers: int) -> torch.Tensor:
        config = text_config(model.config)
        if config.model_type not in FINAL_NORM:
            raise CompiledForwardError(f"compiled forward: model type {config.model_type!r} is not supported "
                                       f"(supported: {sorted(FINAL_NORM)})")
        blocks = find_blocks(model)
        if not 1 <= num_layers <= len(blocks) + 1:
            raise ValueError(f"num_layers must lie in 1..{len(blocks) + 1}, got {num_layers}")
        norm_name = FINAL_NORM[config.model_type]
        norm = _final_norm(model, norm_name) if norm_name else None
        poolings = list(poolings)
        with torch.inference_mode():
            hidden, args, kwargs = _first_block_inputs(model, blocks[0], batch.inputs)
            pooler = LayerPooler(batch.mask, batch.content, poolings)
            first = pooler(hidden)
            out = torch.empty((len(poolings), hidden.shape[0], num_layers, hidden.shape[-1]), dtype=torch.float32,
                              device=hidden.device)
            for i, name in enumerate(poolings):
                out[i, :, 0] = first[name]
            last = len(blocks)                     # the final norm belongs to the last layer only
            for index, block in enumerate(blocks[:num_layers - 1], start=1):
                hidden, pooled = self.step(block, hidden, args, kwargs, pooler, norm if index == last else None)
                out[:, :, index] = pooled
        return out


def _compilations() -> int:
    from torch._dynamo.utils import counters
    return sum(counters["stats"].values()) if "stats" in counters else 0


def _final_norm(model, name: str):
    """The final norm module: on the model itself (LlamaModel) or on its base (LlamaForCausalLM.model)."""
    for owner in (model, getattr(model, "model", None)):
        if owner is not None and isinstance(getattr(owner, name, None), torch.nn.Module):
            return getattr(owner, name)
    raise CompiledForwardError(f"{type(model).__name__} has no final norm {name!r}")


def _first_block_inputs(model, first_block, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple, dict]:
    """Run the model's own forward up to its first block and return that block's (hidden, args, kwargs)."""
    captured: dict[str, Any] = {}

    def record(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["args"] = tuple(args[1:])
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = first_block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)       # no KV cache: nothing to keep, and it would guard per layer
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise CompiledForwardError(f"{type(model).__name__}'s forward never reached its first block")
    return captured["hidden"], captured["args"], captured["kwargs"]
