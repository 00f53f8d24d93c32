"""Smoke test of the benchmark suite: it runs end to end on tiny inputs and writes its results.

No timing assertions: timings belong to the benchmark's output (store/bench/results.md), not to tests.
"""

from __future__ import annotations

import json

from conftest import link_prepared
from pipeline.bench.__main__ import main
from pipeline.config import load_params
from pipeline.corpora import build_corpus, write_corpus


def test_quick_benchmark_runs_and_writes_results(mr_slice, make_params, prepared_models, tmp_path):
    params_path = make_params(mr_slice, ["minilm-l6"], ["mrslice"])
    params = load_params(params_path)
    write_corpus(build_corpus(params.dataset("mrslice"), params.data_mirror, params.data), params.data_dir("mrslice"))
    link_prepared(prepared_models, params.store, ["minilm-l6"])
    out = tmp_path / "bench"
    assert main(["extraction", "attention", "store", "heads", "fusion", "--quick", "--params", str(params_path),
                 "--attention-datasets", "mrslice", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    extraction = results["extraction"]["result"]["minilm-l6"]
    assert set(extraction["methods"]) == {"project", "llmembed", "naive", "careful", "last_layer"}
    assert all(m["tokens_per_s"] > 0 for m in extraction["methods"].values())
    assert extraction["ceiling_flops"]["bfloat16"] > 0
    attention = results["attention"]["result"]["models"]["minilm-l6"]["mrslice"]
    assert set(attention["tokens_per_s"]) == {"sdpa", "eager", "auto"} and min(attention["tokens_per_s"].values()) > 0
    budgets = results["attention"]["result"]["budgets"]["minilm-l6"]["tokens_per_s"]
    assert set(budgets) >= {"1024", "2048"} and min(budgets.values()) > 0
    assert results["store"]["result"]["layouts"] and results["heads"]["result"]["ratio"] > 0
    assert "skipped" in results["fusion"]["result"]          # no store of smollm2 in this throwaway project
    text = (out / "results.md").read_text()
    assert "## extraction" in text and "| project |" in text and "## store" in text and "| minilm-l6 | mrslice |" in text
