"""Rerunnable benchmarks; results to store/bench/results.{json,md} (sections merge across runs).

    python -m pipeline.bench all                       # every benchmark, the full-size defaults
    python -m pipeline.bench extraction --rows 1024    # one or more of: extraction attention store fusion heads memory predict
    python -m pipeline.bench all --quick               # small and fast (the test suite's smoke test)
    python -m pipeline.bench extraction --device cuda --models smollm2-135m   # the same comparison on a GPU
    python -m pipeline.bench extraction --compute-dtype float32   # what an AVX2-only CPU computes in (no native bf16)

Every figure is a ratio to a baseline measured in the same run (or a fraction of a matmul ceiling
measured in the same run), the median of --repeats repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from pipeline.bench.common import REPO, machine
from pipeline.core.errors import PipelineError

SECTIONS = ("extraction", "attention", "store", "fusion", "heads", "memory", "predict")
METHODS = ("project", "compiled", "llmembed", "naive", "careful", "last_layer", "forward_only", "project_threads")


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="+", help=f"{', '.join(SECTIONS)} or all")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--out", default=None, help="folder for results.json/.md (default <store>/bench)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (extraction)")
    parser.add_argument("--models", nargs="+", default=None, help="extraction models (default: params select)")
    parser.add_argument("--dataset", default=None, help="default: the first selected dataset")
    parser.add_argument("--rows", type=int, default=None, help="train texts for the fast loops (default 1024)")
    parser.add_argument("--slow-rows", type=int, default=None, help="texts for llmembed/naive (default 256)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 3)")
    parser.add_argument("--fusion-model", default="smollm2-135m")
    parser.add_argument("--candidates", type=int, default=None, help="sampled fusion candidates (default 300)")
    parser.add_argument("--baseline-candidates", type=int, default=None, help="sklearn candidates (default 8)")
    parser.add_argument("--attention-datasets", nargs="+", default=["mr", "r8"],
                        help="corpora for the attention benchmark: short texts and long ones")
    parser.add_argument("--attention-rows", type=int, default=None, help="texts per corpus there (default 128)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compute-dtype", default=None, choices=("auto", "float32", "bfloat16"),
                        help="override extract.compute_dtype for every loop and the matmul ceiling (float32 "
                             "reproduces an AVX2-only CPU's choice)")
    args = parser.parse_args(argv)
    q = args.quick
    args.rows = args.rows or (24 if q else 1024)
    args.slow_rows = args.slow_rows or (8 if q else 256)
    args.repeats = args.repeats or (1 if q else 3)
    args.candidates = args.candidates or (20 if q else 300)
    args.baseline_candidates = args.baseline_candidates or (3 if q else 24)   # fewer make Spearman noise
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_rss":
        return _rss(argv[1:])
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.config.params import load_params
    params = load_params(args.params)
    what = list(SECTIONS) if "all" in args.what else args.what
    unknown = [w for w in what if w not in SECTIONS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(SECTIONS)} or all", file=sys.stderr)
        return 2
    dataset = args.dataset or (params.selected_datasets or ["mr"])[0]
    models = args.models or (["minilm-l6"] if args.quick else params.selected_models)
    device = torch.device(args.device)
    out_dir = Path(args.out) if args.out else params.store / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    command = "python -m pipeline.bench " + " ".join(argv)
    for section in what:
        started = time.perf_counter()
        print(f"[bench] {section} ...", file=sys.stderr, flush=True)
        info = {"machine": machine(device), "command": command, "quick": args.quick,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            data = run_section(section, args, params, dataset, models, device)
        except (FileNotFoundError, ImportError, PipelineError) as error:   # no store or heads yet
            data = {"skipped": f"{type(error).__name__}: {error}"}
        info["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        results[section] = {**info, "seconds": round(time.perf_counter() - started, 1), "result": data}
        json_path.write_text(json.dumps(results, indent=2, default=str))
        (out_dir / "results.md").write_text(render(results))
        print(f"[bench] {section} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(out_dir / "results.md")
    return 0


def run_section(section, args, params, dataset, models, device):
    if section == "extraction":
        from pipeline.bench import extraction
        return extraction.run(params, models, dataset, args.rows, args.slow_rows, args.repeats, device, args.methods,
                              args.compute_dtype, 1024 if args.quick else 2048)
    if section == "attention":
        from pipeline.bench import attention_bench
        return attention_bench.run(params, models, args.attention_datasets, args.attention_rows or (48 if args.quick else 128),
                                   args.repeats, device, budget_rows=48 if args.quick else 512,
                                   compute_dtype_name=args.compute_dtype)
    if section == "store":
        from pipeline.bench import store_bench
        return store_bench.run(params, 256 if args.quick else 2048, args.repeats)
    if section == "fusion":
        from pipeline.bench import stage2
        return stage2.run_fusion(params, args.fusion_model, dataset, args.candidates, args.baseline_candidates,
                                 args.repeats)
    if section == "heads":
        from pipeline.bench import stage2
        return stage2.run_heads(512 if args.quick else 6398, 128 if args.quick else 710, 3 * 576,
                                1 if args.quick else 3, args.repeats)
    if section == "predict":
        from pipeline.bench import predict_bench
        return predict_bench.run(params, dataset, 64 if args.quick else 1024, args.repeats)
    from pipeline.bench import stage2
    return stage2.run_memory(args.params, args.fusion_model, dataset, 16 if args.quick else 256, models[0])


def _rss(argv) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("idle", "bank", "extract"))
    parser.add_argument("--params", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args(argv)
    from pipeline.bench.stage2 import rss_child
    from pipeline.config.params import load_params
    print(json.dumps(rss_child(args.kind, load_params(args.params), args.model, args.dataset, args.rows)))
    return 0


# -- the Markdown report ---------------------------------------------------------------------------------
def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:,.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def render(results: dict) -> str:
    lines = ["# layerfuse benchmarks", "",
             "Every figure is a ratio to a baseline measured in the same run, or a fraction of a ceiling measured in",
             "the same run; each is the median of the stated repeats. Absolute tokens/s move with the machine's load",
             "(load averages are recorded), the ratios much less. Rerun with the command shown per section.", ""]
    for section in SECTIONS:
        if section not in results:
            continue
        entry = results[section]
        m = entry["machine"]
        lines += [f"## {section}", "",
                  f"`{entry['command']}` - {entry['at']}, {entry['seconds']} s; {m['cpu']}, {m['logical_cpus']} logical "
                  f"CPUs, {m.get('memory_gb', '?')} GB, torch {m['torch']} ({m['torch_threads']} threads), device "
                  f"{m['device']}{' ' + m['gpu'] if 'gpu' in m else ''}; load average {m['load_average']} -> "
                  f"{m.get('load_average_end')}", ""]
        data = entry["result"]
        if "skipped" in data:
            lines += [f"Skipped: {data['skipped']}", ""]
            continue
        lines += MARKDOWN[section](data) + [""]
    return "\n".join(lines)


def _md_extraction(data) -> list[str]:
    lines = []
    for name, res in data.items():
        dtype = res["compute_dtype"]
        ceiling = res["ceiling_flops"][dtype]
        notes = "; ".join(f"{k}: {v}" for k, v in res.get("ceiling_notes", {}).items())
        lines += [f"### {name} on {res['dataset']} train ({res['rows']} texts; llmembed and naive on the first "
                  f"{res['slow_rows']}), compute {dtype} (every loop), ISA {res.get('isa', '?')}, token_budget "
                  f"{res['token_budget']}, block_rows {res['block_rows']}, {res['repeats']} repeats", "",
                  f"Matmul ceiling ({res.get('ceiling_size', 2048)}^2 torch.mm in {dtype}, this run): "
                  f"{ceiling / 1e12:.3g} TFLOP/s" + (f" ({notes})" if notes else ""), "",
                  "| loop | tokens/s (median) | project / this | compiled / this | FLOP/s | of ceiling | samples |",
                  "|---|---|---|---|---|---|---|"]
        methods = res["methods"]
        base = methods.get("project", {}).get("tokens_per_s")
        comp = methods.get("compiled", {}).get("tokens_per_s")
        for method, m in methods.items():
            ratio = f"{base / m['tokens_per_s']:.2f}x" if base else "-"
            ratio_c = f"{comp / m['tokens_per_s']:.2f}x" if comp else "-"
            lines.append(f"| {method} | {_fmt(m['tokens_per_s'])} | {ratio} | {ratio_c} | {m['flops_per_s'] / 1e9:,.1f} G "
                         f"| {m['of_ceiling']:.1%} | {m['tokens_per_s_samples']} |")
        lines.append("")
        for ours in ("project", "compiled"):
            p = methods.get(ours)
            if p:
                lines.append(f"{ours}: store writes (busy time: in line where the CPU computes, on a helper thread on a GPU "
                             f"or to a remote store) {p['store_write_fraction']:.1%} of "
                             f"extraction time; {p['bytes_on_disk'] / 2**20:,.1f} MiB on disk for {res['rows']} texts."
                             + (f" GPU peak memory {p['gpu_peak_mb']:,.0f} MiB." if "gpu_peak_mb" in p else ""))
        if "compile" in res:
            c = res["compile"]
            lines.append(f"compiled: compilation (or compile-cache load) {c['compile_seconds']:.1f} s, paid once per "
                         f"process in a warm-up pass of {c['first_run_seconds']:.1f} s that is not in the table; cache "
                         f"{c['cache_dir']}.")
        lines += _md_outside_forward(res)
        gemm = res.get("gemm", {})
        if gemm.get("share_of_project"):
            lines.append(f"Bound: the model's linear layers alone (F.linear, {dtype}, the project's batch sizes) take "
                         f"{gemm['seconds']:.3g} s of the project's {methods['project']['seconds_median']:.3g} s "
                         f"({gemm['share_of_project']:.0%}): no forward pass with the same matmuls can be more than "
                         f"{gemm['max_speedup_over_project']:.2f}x faster than the eager project.")
        for target, need in res.get("targets", {}).items():
            extra = (f"; it allows {need['allowed_seconds']:.3g} s for these texts, the linear layers alone take "
                     f"{need['gemm_seconds']:.3g} s" if "allowed_seconds" in need else "")
            lines.append(f"Target {target.replace('_', ' ')} ({need['by']}): {need['measured']}x, "
                         f"{'met' if need['met'] else 'not met'}; needs {_fmt(need['tokens_per_s'])} tokens/s, "
                         f"{need['of_ceiling']:.0%} of this run's {dtype} matmul ceiling in useful FLOPs{extra}.")
        lines.append("")
    lines += ["FLOPs per text of n real tokens: 2 x non-embedding parameters x n + 2 x 2 x layers x n^2 x d "
              "(QK^T and AV); padding is not counted."]
    return lines


def _md_outside_forward(res) -> list[str]:
    """The share of the project's time outside the model's forward pass, and the profiler's account of it."""
    outside = res.get("outside_forward")
    if not outside:
        return []
    lines = [f"Outside the model: {outside['fraction']:.1%} of the project's time is spent outside the model's own "
             f"forward pass (1 - forward_only / project, per repeat: {outside['samples']}); target <= 5%: "
             f"{'met' if outside['met'] else 'not met'}."]
    profile = res.get("profile")
    if profile:
        added = ", ".join(f"{o['op']} {o['added_ms']:,.0f} ms ({o['calls']} calls)" for o in profile["top_added_ops"])
        top = ", ".join(f"{o['op']} {o['ms']:,.0f} ms" for o in profile["top_project_ops"])
        kind = "GPU kernel" if profile.get("time") == "device_ms" else "CPU self"
        lines += [f"Profile (torch.profiler, one untimed pass each, operators' {kind} time; work outside torch's "
                  f"operators such as tokenisation and compression is not in it): project "
                  f"{profile['project_ms']:,.0f} ms, forward only {profile['forward_only_ms']:,.0f} ms. "
                  f"The project's largest operators: {top}. What the project adds beyond the forward pass: "
                  f"{added or 'nothing measurable'}."]
    return lines


def _md_attention(data) -> list[str]:
    lines = [f"Forward passes only (compute {data['compute_dtype']}, token_budget {data['token_budget']}, the "
             f"project's batches), {data['repeats']} repeats. `auto` = eager attention for CPU batches padded to at "
             f"most {data['short_width']} tokens, sdpa otherwise (pipeline/hidden_states/attention.py).", "",
             "| model | corpus | texts | mean tokens | median batch width | sdpa tok/s | eager | auto | auto / sdpa |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, corpora in data["models"].items():
        for corpus, v in corpora.items():
            t = v["tokens_per_s"]
            lines.append(f"| {model} | {corpus} | {v['texts']} | {v['mean_tokens']} | {v['median_width']} | "
                         f"{_fmt(t['sdpa'])} | {_fmt(t['eager'])} | {_fmt(t['auto'])} | **{v['vs_sdpa']['auto']}x** |")
    budgets = data.get("budgets", {})
    if budgets:
        sizes = list(next(iter(budgets.values()))["tokens_per_s"])
        lines += ["", f"Token budgets (padded tokens per batch; attention {data['attention']}, {data['budget_corpus']}, "
                  f"the first {next(iter(budgets.values()))['texts']} texts), tokens/s and ratio to the configured "
                  f"{data['token_budget']}:", "",
                  "| model | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
        for model, v in budgets.items():
            lines.append(f"| {model} | " + " | ".join(f"{_fmt(v['tokens_per_s'][k])} ({v['vs_configured'].get(k, '-')}x)"
                                                      for k in sizes) + " |")
    return lines


def _md_predict(data) -> list[str]:
    return [f"{data['rows']} {data['dataset']} test texts, head `{data['head']}`: {data['fusion']}", "",
            "| | texts/s (median) |", "|---|---|",
            f"| predict (only the fusion's models, layers, poolings) | {_fmt(data['predict_texts_per_s'])} |",
            f"| extraction of all layers and poolings of the same models | {_fmt(data['extract_all_texts_per_s'])} |",
            "", f"predict is {data['speedup']}x faster."]


def _md_store(data) -> list[str]:
    lines = [f"{data['shape']} float16 ({data['raw_mb']} MiB raw; values: {data['values']}), written block by block "
             f"({data['block_rows']} rows).", "",
             "| layout | write MB/s | read 1 layer s | read all s | all / one | disk MiB | disk / raw |",
             "|---|---|---|---|---|---|---|"]
    for label, v in data["layouts"].items():
        lines.append(f"| {label} | {_fmt(v['write_mb_s'])} | {_fmt(v['read_one_layer_s'])} | {_fmt(v['read_all_s'])} | "
                     f"{_fmt(v['one_layer_speedup'])}x | {_fmt(v['disk_mb'])} | {_fmt(v['disk_vs_raw'])} |")
    return lines


def _md_fusion(d) -> list[str]:
    lines = [f"{d['model']} x {d['dataset']}, pooling {d['pooling']}, {d['protocol']}, {d['rows']} rows, "
             f"{d['layers']} layers x {d['dim']} (probe rank {d['rank']}); candidate space {d['candidate_space']}, "
             f"{d['sampled']} sampled, {d['repeats']} repeats.", "",
             "| | candidates/s | |", "|---|---|---|",
             f"| fast probe (BlockScorer) | {_fmt(d['fast_candidates_per_s'])} | setup {d['scorer_setup_s']} s, bank "
             f"load {d['bank_load_s']} s; whole space ~{d['whole_space_estimate_s']} s |",
             f"| sklearn LogisticRegression per fold ({d['sklearn_candidates']} candidates) | "
             f"{_fmt(d['sklearn_candidates_per_s'])} | |",
             f"| **speed-up** | **{_fmt(d['speedup'])}x** | Spearman of the rankings: **{d['spearman']}** |", "",
             "| candidate | fast CV accuracy | sklearn CV accuracy |", "|---|---|---|"]
    lines += [f"| {p['candidate']} | {p['fast']} | {p['sklearn']} |" for p in d["pairs"]]
    return lines


def _md_heads(d) -> list[str]:
    return [f"{d['net']}, {d['rows']} x {d['dim']} train rows, {d['val_rows']} validation rows, batch "
            f"{d['batch_size']}, {d['epochs']} epochs x {d['repeats']} repeats (per-epoch time includes each fit's "
            f"set-up).", "",
            "| loop | s / epoch |", "|---|---|",
            f"| Lightning (HeadModule + Trainer) | {_fmt(d['lightning_s_per_epoch'])} |",
            f"| plain torch loop | {_fmt(d['plain_s_per_epoch'])} |",
            f"| **ratio** | **{_fmt(d['ratio'])}x** |"]


def _md_memory(d) -> list[str]:
    lines = ["Each stage in its own process; peak RSS (VmHWM).", "", "| stage | peak RSS MiB | notes |",
             "|---|---|---|"]
    for name, v in d.items():
        notes = ", ".join(f"{k}={_fmt(x)}" for k, x in v.items() if k not in ("peak_rss_mb", "stage"))
        lines.append(f"| {name} | {_fmt(v.get('peak_rss_mb', '-'))} | {notes} |")
    return lines


MARKDOWN = {"extraction": _md_extraction, "attention": _md_attention, "predict": _md_predict, "store": _md_store,
            "fusion": _md_fusion, "heads": _md_heads, "memory": _md_memory}
"""Each section's table writer."""


if __name__ == "__main__":
    sys.exit(main())
