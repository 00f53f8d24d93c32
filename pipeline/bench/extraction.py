"""Benchmark 1: extraction throughput (real tokens/s) of the project against four hand loops.

All five run in one process on the same texts (a slice of a corpus's train split, in corpus
order) and the same model, interleaved repeat by repeat; each figure is the median over repeats.

- project:   pipeline.extract.block_loop.BlockLoop, the code `dvc repro` runs: all layers, all five
             poolings, length-sorted token-budget batches, a real Zarr store written (a fresh one
             per repeat, in a temporary folder), token counting included.
- llmembed:  LLMEmbed's released loop (llama2_embedding/rep_extract.py) as the issue describes it:
             dataset order, fixed batch, padding="max_length" (128), output_hidden_states, unmasked
             mean over tokens of the last 5 layers (the released script asks for float16 on a GPU).
- naive:     a plain Hugging Face loop: dataset order, batch 32, pad to the longest,
             output_hidden_states, masked mean of all layers.
- careful:   what a careful engineer writes by hand: length-sorted batches of 32, output_hidden_states,
             masked mean (float32 sums) of all layers.
- last_layer: sentence-transformers' encode: length-sorted batches of 32, only the final hidden
             state, masked mean: the floor of what any embedding tool pays. The target: the project
             (every layer, every pooling, the store written) at >= 0.95x of it.
- project_threads: the project with tokenisation and writes on helper threads, as on a GPU or to a
             remote store (on a CPU the block loop runs them in line: pipeline/extract/block_loop.overlaps).
- forward_only: the model's own forward pass alone over the project's own batches, tokenised
             beforehand: no hooks, no pooling, no store. 1 - forward_only / project time is the share of
             the project's time spent outside the model (target <= 5%); `profile` names where it goes.
- compiled:  the project with `extract.forward: compiled` (pipeline/extract/compiled_forward.py): the same
             block loop and store, the forward pass compiled by inductor with pooling inside. Its
             compilation (or compile-cache load) happens in a warm-up pass before the timed repeats
             and is reported apart (`compile_seconds`).

Every loop computes in the dtype the project's rule picks on this machine (extract.compute_dtype,
pipeline/extract.resolve_compute_dtype; --compute-dtype overrides it, e.g. float32 to reproduce an
AVX2-only CPU), and the matmul ceiling is measured in that dtype only: ratios compare like with like.
A bf16 ceiling is never measured on a CPU without native bf16 (it would run ~60x slower than fp32
there and mean nothing); it is reported as not applicable.

FLOPs: 2 x non-embedding parameters x real tokens (every linear layer: one multiply-add per weight
per token) plus attention 2 x 2 x layers x n^2 x d per text of n real tokens (QK^T and AV). Padding
is not counted: it is work, but not useful work. Achieved FLOP/s is reported as a fraction of
the square torch.mm ceiling (compute dtype) measured in the same process (start and end of the run).

The bound: `gemm_seconds` is the measured time of the model's linear layers alone (F.linear at the
compute dtype, on the project's padded batch sizes) for the whole run; a forward pass that keeps
those matmuls (the compiled one does) cannot beat the eager project by more than
project seconds / gemm_seconds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench.common import matmul_ceiling, median_time, r, sync
from pipeline.extract.forward import native_bf16

BATCH = 32
STORE_LOOPS = ("project", "compiled", "project_threads")   # the loops that write a store through the block loop
LLMEMBED_LEN = 128
LLMEMBED_LAST = 5


# -- inputs ----------------------------------------------------------------------------------------
def corpus_texts(params, dataset: str, split: str = "train") -> list[str]:
    """Texts of a prepared corpus (store/data/<dataset>), preparing it first when it is missing."""
    from pipeline.sources.corpora import build_corpus, read_corpus, write_corpus
    folder = params.data_dir(dataset)
    if not (folder / "meta.json").is_file():
        write_corpus(build_corpus(params.dataset(dataset), params.data_mirror, params.data), folder)
    return list(read_corpus(folder).splits[split].texts)


def prepared_model(params, name: str) -> Path:
    from pipeline.sources.models import SOURCE_FILE, materialise
    folder = params.model_dir(name)
    if not (folder / SOURCE_FILE).is_file():
        materialise(params.model(name), folder)
    return folder


def load(folder: Path, params, name: str, device: torch.device, dtype: torch.dtype, attention: str | None = None):
    """A model as the hand loops get it (transformers' default attention), or with `attention`."""
    from pipeline.sources.models import load_model
    model, tokenizer = load_model(folder, params.model(name), str(device), dtype, attention)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_flops(model, lengths: np.ndarray) -> float:
    """Useful FLOPs of a forward pass over texts of these real lengths (see the module docstring)."""
    from pipeline.hidden_states.layer_tap import text_config
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


def loop_forward_only(model, batches: list) -> int:
    """The model's forward pass over encoded batches, called as the block loop calls it, output dropped."""
    with torch.inference_mode():
        for batch in batches:
            model(**batch.inputs)
    return sum(batch.tokens for batch in batches)


# -- the project ---------------------------------------------------------------------------------
def run_project(model, tokenizer, texts, settings, device, workdir: Path, num_layers: int, dim: int,
                overlap: bool | None = None) -> dict[str, Any]:
    """The real block loop into a fresh store: token counting, batching, pooling, writes, done marks.
    `settings.forward` picks the forward pass (eager or compiled), as in `dvc repro`; `overlap` forces
    helper threads on or off (None: the block loop's own rule)."""
    from pipeline.extract.block_loop import BlockLoop
    from pipeline.extract.driver import pending_work
    from pipeline.extract.forward import count_tokens
    from pipeline.store.writer import SplitRows, StoreWriter
    path = Path(tempfile.mkdtemp(dir=workdir)) / "store"     # a fresh folder: no old store to delete in the timing
    writer = StoreWriter(path, {"bench": True}, {}, num_layers=num_layers, dim=dim, poolings=settings.poolings,
                         block_rows=settings.block_rows, dtype=settings.dtype, compressor=settings.compressor,
                         rebuild=True)
    counts, truncated = count_tokens(tokenizer, texts, settings.max_len)
    n = len(texts)
    writer.init_split("train", SplitRows(np.zeros(n, np.int32), np.array([str(i) for i in range(n)], dtype=object),
                                         np.arange(n, dtype=np.int64), counts, truncated), [])
    loop = BlockLoop(writer, lambda split: texts, tokenizer, model, settings, device, overlap=overlap)
    overflows = loop.run(pending_work(writer, ["train"]))
    if overflows:
        raise RuntimeError(f"float16 overflow in the benchmark store: {overflows[0]}")
    return {"texts": loop.texts_done, "tokens": loop.tokens, "store_write_seconds": loop.write_seconds, "store": path}


def bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- ceilings and bounds ---------------------------------------------------------------------------


def ceiling_notes(device: torch.device, compute_dtype: torch.dtype) -> dict[str, str]:
    """Why a dtype's ceiling was not measured in this run."""
    notes = {}
    if not native_bf16(device):
        notes["bfloat16"] = "not applicable: this device has no native bf16 (the project computes in float32 here)"
    elif compute_dtype != torch.bfloat16:
        notes["bfloat16"] = "not measured: this run computes in float32"
    if compute_dtype != torch.float32:
        notes["float32"] = f"not measured: this run computes in {str(compute_dtype).removeprefix('torch.')}"
    return notes


def gemm_seconds(model, batch_tokens: list[int], dtype: torch.dtype, device: torch.device,
                 repeats: int = 3) -> float:
    """Measured time of the model's linear layers alone over batches of these padded token counts:
    each distinct (in, out) shape is timed with F.linear at the median batch size, then scaled by the
    total tokens and by how many linear layers share the shape (matmul time is linear in rows here)."""
    import torch.nn.functional as F
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    if not batch_tokens or not shapes:
        return 0.0
    rows = int(statistics.median(batch_tokens))
    total = float(sum(batch_tokens))
    seconds = 0.0
    with torch.inference_mode():
        for (fan_in, fan_out), count in shapes.items():
            x = torch.randn(rows, fan_in, device=device).to(dtype)
            w = torch.randn(fan_out, fan_in, device=device).to(dtype)
            per_call = median_time(lambda: (F.linear(x, w), sync(device)), repeats)
            seconds += per_call * count * total / rows
    return seconds


def project_batches(tokenizer, texts, settings) -> tuple[list[np.ndarray], np.ndarray]:
    """The rows of each batch the project's block loop runs over these texts (blocks of block_rows rows,
    token-budget batches in each), and every text's token count after truncation."""
    from pipeline.hidden_states.batching import token_budget_batches
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=settings.max_len)["input_ids"]])
    batches = []
    for start in range(0, len(lengths), settings.block_rows):
        block = lengths[start:start + settings.block_rows]
        batches += [start + rows for rows in token_budget_batches(block, settings.token_budget)]
    return batches, lengths


def padded_batch_tokens(tokenizer, texts, settings) -> list[int]:
    """Padded tokens (rows x width) of each batch the project's block loop runs over these texts."""
    batches, lengths = project_batches(tokenizer, texts, settings)
    return [len(rows) * int(lengths[rows].max()) for rows in batches]


def encoded_batches(model, tokenizer, texts, settings, device) -> list:
    """The project's batches, encoded as the block loop encodes them (for the forward-only loop)."""
    from pipeline.extract.forward import encode, position_rule
    positions = position_rule(model)
    return [encode(tokenizer, [texts[i] for i in rows], settings.max_len, settings.padding_side, device, positions)
            for rows in project_batches(tokenizer, texts, settings)[0]]


def op_profile(run, device: torch.device) -> dict[str, dict[str, float]]:
    """torch.profiler's operators of one pass of `run`: self time (ms, CPU and, on a GPU, device) and calls."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    return {e.key: {"self_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                    "device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3} for e in prof.key_averages()}


def profile_summary(project: dict, forward_only: dict, top: int = 8, key: str = "self_ms") -> dict[str, Any]:
    """Where the project's time goes beyond the model's forward pass: each operator's self time in one
    project pass minus its self time in one forward-only pass over the same batches (the model's own
    matmuls and norms cancel; pooling, copies and conversions remain), the `top` largest, and the totals.
    `key`: self_ms (CPU time) or device_ms (a GPU's kernel time). Work outside torch's operators
    (tokenisation, compression, Python) is not in it: the outside share above counts that too."""
    total = lambda ops: sum(v[key] for v in ops.values())
    extra = {op: v[key] - forward_only.get(op, {}).get(key, 0.0) for op, v in project.items()}
    ranked = sorted(extra.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return {"project_ms": r(total(project), 4), "forward_only_ms": r(total(forward_only), 4),
            "top_project_ops": [{"op": op, "ms": r(v[key], 4), "calls": v["calls"]} for op, v in
                                sorted(project.items(), key=lambda kv: kv[1][key], reverse=True)[:top]],
            "time": key,
            "top_added_ops": [{"op": op, "added_ms": r(ms, 4), "calls": project[op]["calls"]} for op, ms in ranked
                              if ms > 0]}


# -- the benchmark ---------------------------------------------------------------------------------
def bench_model(params, name: str, dataset: str, rows: int, slow_rows: int, repeats: int, device: torch.device,
                methods: list[str], compute_dtype_name: str | None = None, ceiling_size: int = 2048) -> dict[str, Any]:
    from dataclasses import replace

    from pipeline.extract import compiled_forward
    from pipeline.hidden_states.attention import TRANSFORMERS_DEFAULT, implementation
    from pipeline.extract.forward import resolve_compute_dtype
    from pipeline.hidden_states.layer_tap import text_config
    from pipeline.core.machine import cpu_isa
    if "compiled" in methods:                      # before anything imports inductor and sets its /tmp default
        compiled_forward.use_compile_cache(params.store / "compile_cache")
    folder = prepared_model(params, name)
    texts = corpus_texts(params, dataset)[:rows]
    slow_texts = texts[:slow_rows]
    settings = params.extract.model_copy(update={"device": str(device),
                                                 "compute_dtype": compute_dtype_name or params.extract.compute_dtype})
    compute_dtype = resolve_compute_dtype(settings.compute_dtype, device)
    fast, tokenizer = load(folder, params, name, device, compute_dtype)
    same_kernel = implementation(params.extract.attention, device) == TRANSFORMERS_DEFAULT
    ours = fast if same_kernel else load(folder, params, name, device, compute_dtype, params.extract.attention)[0]
    config = text_config(fast.config)
    num_layers, dim = config.num_hidden_layers + 1, config.hidden_size
    max_len = settings.max_len
    eager_settings = settings.model_copy(update={"forward": "eager"})
    compiled_settings = settings.model_copy(update={"forward": "compiled"})

    def lengths_of(subset, limit):
        return np.array([len(ids) for ids in tokenizer(subset, truncation=True, max_length=limit)["input_ids"]])

    encoded = encoded_batches(ours, tokenizer, texts, eager_settings, device) if "forward_only" in methods else []
    flops = {"full": model_flops(fast, lengths_of(texts, max_len)),
             "slow": model_flops(fast, lengths_of(slow_texts, max_len)),
             "llmembed": model_flops(fast, lengths_of(slow_texts, LLMEMBED_LEN))}
    dtype_name = str(compute_dtype).removeprefix("torch.")
    ceilings = {dtype_name: [matmul_ceiling(device, compute_dtype, ceiling_size)]}
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    warmup: dict[str, Any] = {}
    profiled: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="layerfuse-bench-") as tmp:
        loops = {
            "project": lambda: run_project(ours, tokenizer, texts, eager_settings, device, Path(tmp), num_layers, dim),
            "project_threads": lambda: run_project(ours, tokenizer, texts, eager_settings, device, Path(tmp), num_layers,
                                                   dim, overlap=True),
            "compiled": lambda: run_project(ours, tokenizer, texts, compiled_settings, device, Path(tmp), num_layers,
                                            dim),
            "llmembed": lambda: {"tokens": loop_llmembed(fast, tokenizer, slow_texts, device)},
            "naive": lambda: {"tokens": loop_naive(fast, tokenizer, slow_texts, device, max_len)},
            "careful": lambda: {"tokens": loop_careful(fast, tokenizer, texts, device, max_len)},
            "last_layer": lambda: {"tokens": loop_careful(fast, tokenizer, texts, device, max_len, all_layers=False)},
            "forward_only": lambda: {"tokens": loop_forward_only(ours, encoded)},
        }
        for method in methods:                      # warm-up: one small batch each (first-call costs)
            if method == "forward_only":
                loop_forward_only(ours, encoded[:1])
            elif method not in STORE_LOOPS:
                {"llmembed": loop_llmembed, "naive": lambda *a: loop_naive(*a, max_len),
                 "careful": lambda *a: loop_careful(*a, max_len),
                 "last_layer": lambda *a: loop_careful(*a, max_len, all_layers=False)}[method](
                    fast, tokenizer, texts[:8], device)
        if "compiled" in methods:                   # compilation (or a compile-cache load), timed apart
            account = compiled_forward.shared()
            before, started = account.compile_seconds, time.perf_counter()
            loops["compiled"]()
            warmup = {"first_run_seconds": r(time.perf_counter() - started, 4),
                      "compile_seconds": r(account.compile_seconds - before, 4),
                      "cache_dir": str(compiled_forward.cache_dir())}
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
                if method in STORE_LOOPS:
                    run["store_write_seconds"] = out.get("store_write_seconds", 0.0)
                    run["bytes_on_disk"] = bytes_on_disk(out["store"])    # after the timing
                    shutil.rmtree(out["store"].parent)
                if device.type == "cuda":
                    run["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                runs[method].append(run)
        if {"project", "forward_only"} <= set(methods):   # one more pass of each, under the profiler (not timed)
            profiled = profile_summary(op_profile(loops["project"], device), op_profile(loops["forward_only"], device),
                                       key="device_ms" if device.type == "cuda" else "self_ms")
    ceilings[dtype_name].append(matmul_ceiling(device, compute_dtype, ceiling_size))
    ceiling = {k: statistics.median(v) for k, v in ceilings.items()}
    gemm = gemm_seconds(ours, padded_batch_tokens(tokenizer, texts, settings), compute_dtype, device)

    result: dict[str, Any] = {"model": name, "dataset": dataset, "rows": len(texts), "slow_rows": len(slow_texts),
                              "repeats": repeats, "compute_dtype": dtype_name, "isa": cpu_isa(),
                              "native_bf16": native_bf16(device), "token_budget": settings.token_budget,
                              "block_rows": settings.block_rows, "attention": settings.attention,
                              "ceiling_size": ceiling_size, "ceiling_flops": ceiling, "ceiling_samples": ceilings,
                              "ceiling_notes": ceiling_notes(device, compute_dtype), "methods": {}}
    if warmup:
        result["compile"] = {**warmup, "recompiles_logged_with": "TORCH_LOGS=recompiles"}
    for method, samples in runs.items():
        tps = statistics.median(s["tokens_per_s"] for s in samples)
        work = flops["llmembed"] if method == "llmembed" else flops["slow"] if method == "naive" else flops["full"]
        seconds = statistics.median(s["seconds"] for s in samples)
        entry = {"tokens_per_s": r(tps, 4), "tokens": samples[0]["tokens"], "seconds_median": r(seconds, 4),
                 "tokens_per_s_samples": [r(s["tokens_per_s"], 4) for s in samples], "dtype": dtype_name,
                 "flops_per_s": r(work / seconds), "of_ceiling": r(work / seconds / ceiling[dtype_name])}
        if method in STORE_LOOPS:
            fractions = [s["store_write_seconds"] / s["seconds"] for s in samples]
            entry["store_write_fraction"] = r(statistics.median(fractions))
            entry["bytes_on_disk"] = samples[0]["bytes_on_disk"]
        if device.type == "cuda":
            entry["gpu_peak_mb"] = r(max(s["gpu_peak_mb"] for s in samples), 4)
        result["methods"][method] = entry
    m = result["methods"]
    for ours_name in ("project", "compiled"):
        if ours_name in m:
            for other in ("careful", "llmembed", "naive", "last_layer", "project"):
                if other in m and other != ours_name:
                    result[f"{ours_name}_vs_{other}"] = r(m[ours_name]["tokens_per_s"] / m[other]["tokens_per_s"])
    if "project" in m and "forward_only" in m:
        outside = [1 - f["seconds"] / p["seconds"] for p, f in zip(runs["project"], runs["forward_only"])]
        result["outside_forward"] = {"fraction": r(statistics.median(outside)), "samples": [r(x) for x in outside],
                                     "target": 0.05, "met": statistics.median(outside) <= 0.05}
        if profiled:
            result["profile"] = profiled
    result["gemm"] = {"seconds": r(gemm, 4)}
    if "project" in m and gemm > 0:
        result["gemm"].update({"share_of_project": r(gemm / m["project"]["seconds_median"]),
                               "max_speedup_over_project": r(m["project"]["seconds_median"] / gemm)})
    best = max((x for x in ("compiled", "project") if x in m), key=lambda x: m[x]["tokens_per_s"], default=None)
    result["targets"] = target_bounds(m, best, flops["full"] / m[best]["tokens"] if best else None,
                                      ceiling[dtype_name], gemm)
    del fast, ours
    return result


def target_bounds(methods: dict[str, Any], ours: str | None, flops_per_token: float | None, ceiling: float,
                  gemm: float = 0.0) -> dict[str, Any]:
    """What the issue's targets ask of this machine, against the faster of our two paths (`ours`): the
    tokens/s they need, the fraction of the measured matmul ceiling (compute dtype) that rate is in
    useful FLOPs (above 100% no code can meet them), and, with `gemm`, the seconds the target allows
    against the seconds the model's linear layers alone take (allowed < gemm: out of reach without
    faster matmuls)."""
    out: dict[str, Any] = {}
    if flops_per_token is None or ours is None:
        return out
    tokens = methods[ours]["tokens"]
    for other, factor in (("last_layer", 0.95), ("careful", 1.5), ("llmembed", 10.0)):
        if other in methods:
            needed = factor * methods[other]["tokens_per_s"]
            entry = {"by": ours, "measured": r(methods[ours]["tokens_per_s"] / methods[other]["tokens_per_s"]),
                     "met": methods[ours]["tokens_per_s"] >= needed, "tokens_per_s": r(needed, 4),
                     "of_ceiling": r(needed * flops_per_token / ceiling)}
            if gemm > 0 and other == "careful":
                entry["allowed_seconds"] = r(tokens / needed, 4)
                entry["gemm_seconds"] = r(gemm, 4)
            out[f"{factor:g}x_{other}"] = entry
    return out


def run(params, models: list[str], dataset: str, rows: int, slow_rows: int, repeats: int, device: torch.device,
        methods: list[str], compute_dtype: str | None = None, ceiling_size: int = 2048) -> dict[str, Any]:
    return {name: bench_model(params, name, dataset, rows, slow_rows, repeats, device, methods, compute_dtype,
                              ceiling_size) for name in models}


if __name__ == "__main__":   # pragma: no cover
    print(json.dumps({"see": "python -m pipeline.bench extraction --help"}))
