"""Benchmark 1: extraction throughput (real tokens/s) of the project against four hand loops.

All five run in one process on the same texts (a slice of a corpus's train split, in corpus
order) and the same model, interleaved repeat by repeat; each figure is the median over repeats.

- project:   pipeline.extract.process_blocks, the code `dvc repro` runs: all layers, all five
             poolings, length-sorted token-budget batches, a real Zarr store written (a fresh one
             per repeat, in a temporary folder), token counting included.
- llmembed:  LLMEmbed's released loop (llama2_embedding/rep_extract.py) as the issue describes it:
             dataset order, fixed batch, padding="max_length" (128), output_hidden_states, unmasked
             mean over tokens of the last 5 layers; float32 (the released script asks for float16 on a
             GPU; float32 on this CPU reproduces the issue's ~130 tokens/s reference for SmolLM2).
- naive:     a plain Hugging Face loop: dataset order, batch 32, pad to the longest, float32,
             output_hidden_states, masked mean of all layers.
- careful:   what a careful engineer writes by hand: length-sorted batches of 32, bf16 where the
             device has it, output_hidden_states, masked mean (float32 sums) of all layers.
- last_layer: sentence-transformers' encode: length-sorted batches of 32, bf16, only the final
             hidden state, masked mean: the floor of what any embedding tool pays.

FLOPs: 2 x non-embedding parameters x real tokens (every linear layer: one multiply-add per weight
per token) plus attention 2 x 2 x layers x n^2 x d per text of n real tokens (QK^T and AV). Padding
is not counted: it is work, but not useful work. Achieved FLOP/s is reported as a fraction of
the square torch.mm ceiling (bf16 and fp32) measured in the same process (start and end of the run).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.bench.common import matmul_ceiling, r, sync

BATCH = 32
LLMEMBED_LEN = 128
LLMEMBED_LAST = 5


# -- inputs ----------------------------------------------------------------------------------------
def corpus_texts(params, dataset: str, split: str = "train") -> list[str]:
    """Texts of a prepared corpus (store/data/<dataset>), preparing it first when it is missing."""
    from pipeline.corpora import build_corpus, read_corpus, write_corpus
    folder = params.data_dir(dataset)
    if not (folder / "meta.json").is_file():
        write_corpus(build_corpus(params.dataset(dataset), params.data_mirror, params.data), folder)
    return list(read_corpus(folder).splits[split].texts)


def prepared_model(params, name: str) -> Path:
    from pipeline.models import SOURCE_FILE, materialise
    folder = params.model_dir(name)
    if not (folder / SOURCE_FILE).is_file():
        materialise(params.model(name), folder)
    return folder


def load(folder: Path, params, name: str, device: torch.device, dtype: torch.dtype, attention: str | None = None):
    """A model as the hand loops get it (transformers' default attention), or with `attention`."""
    from pipeline.models import load_model
    model, tokenizer = load_model(folder, params.model(name), str(device), dtype, attention)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_flops(model, lengths: np.ndarray) -> float:
    """Useful FLOPs of a forward pass over texts of these real lengths (see the module docstring)."""
    from pipeline.layer_tap import text_config
    config = text_config(model.config)
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    lengths = lengths.astype(np.float64)
    attention = 4.0 * config.num_hidden_layers * config.hidden_size * float((lengths ** 2).sum())
    return 2.0 * non_embedding * float(lengths.sum()) + attention


# -- the baselines (hand loops, written here on purpose: they are what the project is measured against)
def _to(enc, device):
    return {k: v.to(device) for k, v in enc.items()}


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)


def loop_llmembed(model, tokenizer, texts, device) -> int:
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(texts), BATCH):
            enc = tokenizer(texts[i:i + BATCH], padding="max_length", max_length=LLMEMBED_LEN, truncation=True,
                            return_tensors="pt")
            tokens += int(enc["attention_mask"].sum())
            states = model(**_to(enc, device), output_hidden_states=True).hidden_states
            pooled = torch.stack([h.float().mean(1) for h in states[-LLMEMBED_LAST:]], 1)   # unmasked
            pooled.cpu()
    return tokens


def loop_naive(model, tokenizer, texts, device, max_len: int) -> int:
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(texts), BATCH):
            enc = tokenizer(texts[i:i + BATCH], padding=True, max_length=max_len, truncation=True, return_tensors="pt")
            tokens += int(enc["attention_mask"].sum())
            enc = _to(enc, device)
            states = model(**enc, output_hidden_states=True).hidden_states
            torch.stack([_masked_mean(h, enc["attention_mask"]) for h in states], 1).cpu()
    return tokens


def _sorted_batches(tokenizer, texts, max_len: int) -> list[list[int]]:
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + BATCH].tolist() for i in range(0, len(order), BATCH)]


def loop_careful(model, tokenizer, texts, device, max_len: int, all_layers: bool = True) -> int:
    tokens = 0
    with torch.inference_mode():
        for rows in _sorted_batches(tokenizer, texts, max_len):
            enc = tokenizer([texts[i] for i in rows], padding=True, max_length=max_len, truncation=True,
                            return_tensors="pt")
            tokens += int(enc["attention_mask"].sum())
            enc = _to(enc, device)
            if all_layers:
                states = model(**enc, output_hidden_states=True).hidden_states
                torch.stack([_masked_mean(h, enc["attention_mask"]) for h in states], 1).cpu()
            else:
                _masked_mean(model(**enc).last_hidden_state, enc["attention_mask"]).cpu()
    return tokens


# -- the project ---------------------------------------------------------------------------------
def run_project(model, tokenizer, texts, settings, device, workdir: Path, num_layers: int, dim: int) -> dict[str, Any]:
    """The real block loop into a fresh store: token counting, batching, pooling, writes, done marks."""
    from pipeline.extract import count_tokens, pending_work, process_blocks
    from pipeline.store import SplitRows, StoreWriter
    path = workdir / "store"
    writer = StoreWriter(path, {"bench": True}, {}, num_layers=num_layers, dim=dim, poolings=settings.poolings,
                         block_rows=settings.block_rows, dtype=settings.dtype, compressor=settings.compressor,
                         rebuild=True)
    counts, truncated = count_tokens(tokenizer, texts, settings.max_len)
    n = len(texts)
    writer.init_split("train", SplitRows(np.zeros(n, np.int32), np.array([str(i) for i in range(n)], dtype=object),
                                         np.arange(n, dtype=np.int64), counts, truncated), [])
    corpus = SimpleNamespace(splits={"train": SimpleNamespace(texts=texts)})
    summary: dict[str, Any] = {"texts": 0, "tokens": 0}
    overflows = process_blocks(writer, pending_work(writer, ["train"]), model, tokenizer, corpus, settings, device,
                               num_layers, dim, summary)
    if overflows:
        raise RuntimeError(f"float16 overflow in the benchmark store: {overflows[0]}")
    summary["bytes_on_disk"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return summary


# -- the benchmark ---------------------------------------------------------------------------------
def bench_model(params, name: str, dataset: str, rows: int, slow_rows: int, repeats: int, device: torch.device,
                methods: list[str]) -> dict[str, Any]:
    from dataclasses import replace

    from pipeline.attention import TRANSFORMERS_DEFAULT, implementation
    from pipeline.extract import resolve_compute_dtype
    from pipeline.layer_tap import text_config
    folder = prepared_model(params, name)
    texts = corpus_texts(params, dataset)[:rows]
    slow_texts = texts[:slow_rows]
    compute_dtype = resolve_compute_dtype(params.extract.compute_dtype, device)
    fast, tokenizer = load(folder, params, name, device, compute_dtype)
    slow = fast if compute_dtype == torch.float32 else load(folder, params, name, device, torch.float32)[0]
    same_kernel = implementation(params.extract.attention, device) == TRANSFORMERS_DEFAULT
    ours = fast if same_kernel else load(folder, params, name, device, compute_dtype, params.extract.attention)[0]
    config = text_config(fast.config)
    num_layers, dim = config.num_hidden_layers + 1, config.hidden_size
    settings = replace(params.extract, device=str(device))
    max_len = settings.max_len

    def lengths_of(subset, limit):
        return np.array([len(ids) for ids in tokenizer(subset, truncation=True, max_length=limit)["input_ids"]])

    flops = {"full": model_flops(fast, lengths_of(texts, max_len)),
             "slow": model_flops(fast, lengths_of(slow_texts, max_len)),
             "llmembed": model_flops(fast, lengths_of(slow_texts, LLMEMBED_LEN))}
    ceilings = {"bfloat16": [matmul_ceiling(device, torch.bfloat16)], "float32": [matmul_ceiling(device, torch.float32)]}
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="layerfuse-bench-") as tmp:
        loops = {
            "project": lambda: run_project(ours, tokenizer, texts, settings, device, Path(tmp), num_layers, dim),
            "llmembed": lambda: {"tokens": loop_llmembed(slow, tokenizer, slow_texts, device)},
            "naive": lambda: {"tokens": loop_naive(slow, tokenizer, slow_texts, device, max_len)},
            "careful": lambda: {"tokens": loop_careful(fast, tokenizer, texts, device, max_len)},
            "last_layer": lambda: {"tokens": loop_careful(fast, tokenizer, texts, device, max_len, all_layers=False)},
        }
        for method in methods:                      # warm-up: one small batch each (first-call costs)
            if method != "project":
                {"llmembed": loop_llmembed, "naive": lambda *a: loop_naive(*a, max_len),
                 "careful": lambda *a: loop_careful(*a, max_len),
                 "last_layer": lambda *a: loop_careful(*a, max_len, all_layers=False)}[method](
                    slow if method in ("llmembed", "naive") else fast, tokenizer, texts[:8], device)
        for _ in range(repeats):
            for method in methods:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                start = time.perf_counter()
                out = loops[method]()
                sync(device)
                seconds = time.perf_counter() - start
                run = {"seconds": seconds, "tokens": out["tokens"], "tokens_per_s": out["tokens"] / seconds}
                if method == "project":
                    run["store_write_seconds"] = out.get("store_write_seconds", 0.0)
                    run["bytes_on_disk"] = out.get("bytes_on_disk", 0)
                if device.type == "cuda":
                    run["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                runs[method].append(run)
    ceilings["bfloat16"].append(matmul_ceiling(device, torch.bfloat16))
    ceilings["float32"].append(matmul_ceiling(device, torch.float32))
    ceiling = {k: statistics.median(v) for k, v in ceilings.items()}

    result: dict[str, Any] = {"model": name, "dataset": dataset, "rows": len(texts), "slow_rows": len(slow_texts),
                              "repeats": repeats, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                              "token_budget": settings.token_budget, "block_rows": settings.block_rows,
                              "ceiling_flops": ceiling, "ceiling_samples": ceilings, "methods": {}}
    for method, samples in runs.items():
        tps = statistics.median(s["tokens_per_s"] for s in samples)
        work = flops["llmembed"] if method == "llmembed" else flops["slow"] if method == "naive" else flops["full"]
        seconds = statistics.median(s["seconds"] for s in samples)
        entry = {"tokens_per_s": r(tps, 4), "tokens": samples[0]["tokens"], "seconds_median": r(seconds, 4),
                 "tokens_per_s_samples": [r(s["tokens_per_s"], 4) for s in samples],
                 "flops_per_s": r(work / seconds), "mfu_bf16": r(work / seconds / ceiling["bfloat16"]),
                 "mfu_fp32": r(work / seconds / ceiling["float32"])}
        if method == "project":
            fractions = [s["store_write_seconds"] / s["seconds"] for s in samples]
            entry["store_write_fraction"] = r(statistics.median(fractions))
            entry["bytes_on_disk"] = samples[0]["bytes_on_disk"]
        if device.type == "cuda":
            entry["gpu_peak_mb"] = r(max(s["gpu_peak_mb"] for s in samples), 4)
        result["methods"][method] = entry
    m = result["methods"]
    if "project" in m:
        for other in ("careful", "llmembed", "naive", "last_layer"):
            if other in m:
                result[f"project_vs_{other}"] = r(m["project"]["tokens_per_s"] / m[other]["tokens_per_s"])
    result["targets"] = target_bounds(m, flops["full"] / m["project"]["tokens"] if "project" in m else None,
                                      ceiling["bfloat16"])
    del fast, slow, ours
    return result


def target_bounds(methods: dict[str, Any], flops_per_token: float | None, ceiling: float) -> dict[str, Any]:
    """What the issue's targets ask of this machine: the tokens/s they need and the fraction of the
    measured bf16 matmul ceiling that rate is (useful FLOPs only). Above 100% no code can meet them."""
    out: dict[str, Any] = {}
    if flops_per_token is None:
        return out
    for other, factor in (("careful", 1.5), ("llmembed", 10.0)):
        if other in methods:
            needed = factor * methods[other]["tokens_per_s"]
            out[f"{factor:g}x_{other}"] = {"tokens_per_s": r(needed, 4),
                                          "of_bf16_ceiling": r(needed * flops_per_token / ceiling)}
    return out


def run(params, models: list[str], dataset: str, rows: int, slow_rows: int, repeats: int, device: torch.device,
        methods: list[str]) -> dict[str, Any]:
    return {name: bench_model(params, name, dataset, rows, slow_rows, repeats, device, methods) for name in models}


if __name__ == "__main__":   # pragma: no cover
    print(json.dumps({"see": "python -m pipeline.bench extraction --help"}))
