"""The block loop of Stage 1: for each (split, block), tokenise, compute and pool every layer, and
write. Where the forward pass runs on an accelerator, or the store is remote, tokenisation (the next
batch) and the store's writes (the previous block) run on helper threads that overlap it. Where the
CPU itself computes, they run in line: a helper thread would take its cycles from torch's own
threads, and stall their parallel ops (measured: `python -m pipeline.bench extraction`, docs/benchmarks.md).
Every process (a single one, or each rank of a distributed run) runs its blocks through it.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from pipeline.config.sections import ExtractSettings
from pipeline.core import location
from pipeline.extract import compiled_forward
from pipeline.extract.forward import (Encoded, Forward, PoolingSpec, eager_forward, encode, pool_batch, position_rule,
                                      to_host)
from pipeline.hidden_states.attention import attention_entropy
from pipeline.hidden_states.batching import token_budget_batches
from pipeline.store.format import SAMPLED, Float16Overflow
from pipeline.store.writer import StoreWriter


class InlineExecutor(Executor):
    """An executor that runs each task at once, in the caller's thread: the block loop's steps in line."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:       # handed back through the future, as a thread pool would; a signal's
            future.set_exception(error)  # Terminated (a BaseException) stops the loop at once
        return future


def overlaps(device: torch.device, store_path) -> bool:
    """Whether tokenisation and writes get helper threads: when the CPU is not the one computing (a GPU)
    or the writes wait on a network (a remote store), not when they would compete with the forward pass."""
    return device.type != "cpu" or location.is_url(store_path)


class BlockLoop:
    """Computes, writes and marks done (split, block) pairs: the one block code path of every process.

    Three steps, one method each: tokenise (`overlap`: a helper thread encodes the next batch while this
    one runs), compute and pool (`forward`, the pluggable seam), write (`overlap`: a helper thread
    compresses, writes, digests and marks done the previous block while the next one is computed).
    At most one write is in flight and its outcome is collected before the next block is handed over,
    so blocks are still marked done in order, only after their data, and a crash never marks an
    unwritten block done. A block's numbers depend only on its own rows.
    A float16 overflow is collected, not handled: the rest of that split's blocks are skipped, the
    other splits go on, and the caller promotes the array and redoes the split.
    """

    def __init__(self, writer: StoreWriter, texts: Callable[[str], list[str]], tokenizer, model,
                 settings: ExtractSettings, device: torch.device, forward: Forward | None = None,
                 overlap: bool | None = None):
        if forward is None:          # as extract.forward says (pipeline/extract/compiled_forward.py)
            wanted = compiled_forward.resolve_forward(settings.forward, device, model)
            forward = compiled_forward.shared() if wanted == "compiled" else eager_forward
        self.writer, self.texts, self.tokenizer, self.model = writer, texts, tokenizer, model
        self.settings, self.device, self.forward = settings, device, forward
        self.overlap = overlaps(device, writer.path) if overlap is None else overlap
        self.positions = position_rule(model)
        self.texts_done, self.tokens, self.write_seconds, self.entropy_seconds = 0, 0, 0.0, 0.0
        self.overflows: list[Float16Overflow] = []
        self._token_counts: dict[str, np.ndarray] = {}
        self._sampled: dict[str, np.ndarray] = {}
        self._in_flight: tuple[Future, int] | None = None

    def run(self, work: list[tuple[str, int]], bar=None) -> list[Float16Overflow]:
        """Do `work` in order; returns the float16 overflows met (each names a split to redo)."""
        self.overflows = []
        self._tokenise, self._store = self._helper("layerfuse-tokenise"), self._helper("layerfuse-write")
        started = time.perf_counter()
        try:
            for split, block in work:
                if self._overflowed(split):
                    continue
                buffers = self._compute(split, block, bar, started)
                entropy = self._entropy(split, block) if self.writer.entropy else None
                self._settle()
                if self._overflowed(split):
                    continue                  # this block is dropped unwritten: its split is redone
                self._write_behind(split, block, buffers, entropy)
            self._settle()
            return self.overflows
        finally:
            self._tokenise.shutdown(wait=True, cancel_futures=True)
            self._store.shutdown(wait=True)   # an error above still lets a started write finish whole

    def _helper(self, name: str) -> Executor:
        return ThreadPoolExecutor(1, thread_name_prefix=name) if self.overlap else InlineExecutor()

    def _overflowed(self, split: str) -> bool:
        return any(o.split == split for o in self.overflows)

    # -- prefetch and tokenise ------------------------------------------------------------------
    def _batches(self, split: str, block: int) -> tuple[int, list[tuple[np.ndarray, list[str]]]]:
        """The block's first row and its token-budget batches: (row positions in the block, texts)."""
        if split not in self._token_counts:
            self._token_counts[split] = self.writer.root[split]["token_count"][:]
        start, stop = self.writer.block_range(split, block)
        lengths = np.minimum(self._token_counts[split][start:stop], self.settings.max_len)
        texts = self.texts(split)
        return start, [(rows, [texts[start + r] for r in rows])
                       for rows in token_budget_batches(lengths, self.settings.token_budget)]

    def _encode(self, texts: list[str]) -> Encoded:
        return encode(self.tokenizer, texts, self.settings.max_len, self.settings.padding_side, self.device,
                      self.positions)

    # -- compute and pool -----------------------------------------------------------------------
    def _compute(self, split: str, block: int, bar, started: float) -> dict[str, np.ndarray]:
        """The block's pooled vectors [rows, layers, D] per pooling; the next batch is encoded meanwhile."""
        start, batches = self._batches(split, block)
        stop = self.writer.block_range(split, block)[1]
        spec = PoolingSpec.of(self.settings)
        buffers = {p: np.empty((stop - start, self.writer.num_layers, self.writer.dim), dtype=np.float32)
                   for p in spec.poolings}
        upcoming = self._tokenise.submit(self._encode, batches[0][1]) if batches else None
        for index, (rows, texts) in enumerate(batches):
            batch = upcoming.result()
            if index + 1 < len(batches):
                upcoming = self._tokenise.submit(self._encode, batches[index + 1][1])
            vectors, tokens = pool_batch(self.model, self.tokenizer, texts, spec, self.device,
                                         self.writer.num_layers, batch=batch, forward=self.forward)
            for name, values in vectors.items():
                buffers[name][rows] = values
            self.tokens += tokens
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{self.tokens / (time.perf_counter() - started):,.0f}", refresh=False)
        return buffers

    def _entropy(self, split: str, block: int) -> np.ndarray:
        """The block's attention entropy [rows, layers] float32: NaN in column 0 (the embedding output has
        no attention) and outside the block's sample; the sampled rows go through one more forward pass,
        with eager attention, in token-budget batches of their own (so only the block's rows matter)."""
        began = time.perf_counter()
        if split not in self._sampled:
            self._sampled[split] = self.writer.root[split][SAMPLED][:].astype(bool)
        start, stop = self.writer.block_range(split, block)
        out = np.full((stop - start, self.writer.num_layers), np.nan, dtype=np.float32)
        chosen = np.flatnonzero(self._sampled[split][start:stop])
        lengths = np.minimum(self._token_counts[split][start + chosen], self.settings.max_len)
        texts = self.texts(split)
        for part in token_budget_batches(lengths, self.settings.token_budget):
            rows = chosen[part]
            batch = self._encode([texts[start + r] for r in rows])
            values = attention_entropy(self.model, batch.inputs, batch.mask, self.writer.num_layers - 1)
            out[rows, 1:] = to_host(values)
        self.entropy_seconds += time.perf_counter() - began
        return out

    # -- write behind ---------------------------------------------------------------------------
    def _write_behind(self, split: str, block: int, buffers: dict[str, np.ndarray],
                      entropy: np.ndarray | None) -> None:
        start, stop = self.writer.block_range(split, block)
        self._in_flight = (self._store.submit(self._timed_write, split, block, buffers, entropy), stop - start)

    def _timed_write(self, split: str, block: int, buffers: dict[str, np.ndarray], entropy: np.ndarray | None) -> None:
        began = time.perf_counter()
        try:
            self.writer.write_block(split, block, buffers, entropy)
        finally:
            self.write_seconds += time.perf_counter() - began

    def _settle(self) -> None:
        """Collect the write in flight: count its rows, or record its float16 overflow."""
        if self._in_flight is None:
            return
        future, rows = self._in_flight
        self._in_flight = None
        try:
            future.result()
        except Float16Overflow as overflow:
            self.overflows.append(overflow)
            return
        self.texts_done += rows
