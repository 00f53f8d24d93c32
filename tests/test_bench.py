"""Smoke test of the benchmark suite: it runs end to end on tiny inputs and writes its results.

No timing assertions: timings belong to the benchmark's output (store/bench/results.md), not to tests.
"""

from __future__ import annotations

import json

import pytest

from conftest import link_prepared
from pipeline.bench.__main__ import main
from pipeline.config.params import load_params
from pipeline.sources.corpora import build_corpus, write_corpus

pytestmark = pytest.mark.slow     # real models timed by the benchmark


def test_quick_benchmark_runs_and_writes_results(mr_slice, make_params, prepared_models, tmp_path, monkeypatch):
    params_path = make_params(mr_slice, ["minilm-l6"], ["mrslice"])
    params = load_params(params_path)
    write_corpus(build_corpus(params.dataset("mrslice"), params.data_mirror, params.data), params.data_dir("mrslice"))
    link_prepared(prepared_models, params.store, ["minilm-l6"])
    out = tmp_path / "bench"
    # a compile cache of the test's own: a test never writes into the repository's store/
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile_cache"))
    assert main(["extraction", "attention", "store", "heads", "fusion", "--quick", "--params", str(params_path),
                 "--attention-datasets", "mrslice", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    extraction = results["extraction"]["result"]["minilm-l6"]
    assert set(extraction["methods"]) == {"project", "compiled", "llmembed", "naive", "careful", "last_layer",
                                          "forward_only", "project_threads"}
    assert extraction["methods"]["project_threads"]["tokens"] == extraction["methods"]["project"]["tokens"]
    # the forward-only loop runs the project's own batches: the same real tokens
    assert extraction["methods"]["forward_only"]["tokens"] == extraction["methods"]["project"]["tokens"]
    outside = extraction["outside_forward"]
    assert len(outside["samples"]) == extraction["repeats"] and outside["fraction"] < 1
    # the profile names real operators: the forward pass's matmuls are among the project's largest
    assert any("linear" in o["op"] or "addmm" in o["op"] or "mm" in o["op"]
               for o in extraction["profile"]["top_project_ops"])
    assert extraction["targets"]["0.95x_last_layer"]["by"] in ("project", "compiled")
    assert all(m["tokens_per_s"] > 0 for m in extraction["methods"].values())
    dtype = extraction["compute_dtype"]
    assert {m["dtype"] for m in extraction["methods"].values()} == {dtype}     # like with like
    assert set(extraction["ceiling_flops"]) == {dtype} and extraction["ceiling_flops"][dtype] > 0
    assert extraction["isa"] and results["extraction"]["machine"]["isa"] == extraction["isa"]
    assert extraction["compile"]["first_run_seconds"] > 0 and extraction["gemm"]["seconds"] > 0
    assert extraction["methods"]["compiled"]["tokens"] == extraction["methods"]["project"]["tokens"]
    attention = results["attention"]["result"]["models"]["minilm-l6"]["mrslice"]
    assert set(attention["tokens_per_s"]) == {"sdpa", "eager", "auto"} and min(attention["tokens_per_s"].values()) > 0
    budgets = results["attention"]["result"]["budgets"]["minilm-l6"]["tokens_per_s"]
    assert set(budgets) >= {"1024", "2048"} and min(budgets.values()) > 0
    assert results["store"]["result"]["layouts"] and results["heads"]["result"]["ratio"] > 0
    assert "skipped" in results["fusion"]["result"]          # no store of smollm2 in this throwaway project
    text = (out / "results.md").read_text()
    assert "Outside the model:" in text and "Profile (torch.profiler" in text
    assert "## extraction" in text and "| project |" in text and "| compiled |" in text and "## store" in text and "| minilm-l6 | mrslice |" in text


def test_float32_run_never_measures_a_bf16_ceiling(mr_slice, make_params, prepared_models, tmp_path):
    """--compute-dtype float32 (an AVX2-only CPU's choice): every loop and the ceiling run in float32,
    and the bf16 ceiling is reported as not measured or not applicable, never as a number."""
    params_path = make_params(mr_slice, ["minilm-l6"], ["mrslice"])
    params = load_params(params_path)
    write_corpus(build_corpus(params.dataset("mrslice"), params.data_mirror, params.data), params.data_dir("mrslice"))
    link_prepared(prepared_models, params.store, ["minilm-l6"])
    out = tmp_path / "bench"
    assert main(["extraction", "--quick", "--compute-dtype", "float32", "--methods", "project", "careful",
                 "--params", str(params_path), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["extraction"]["result"]["minilm-l6"]
    assert result["compute_dtype"] == "float32" and set(result["ceiling_flops"]) == {"float32"}
    assert "bfloat16" in result["ceiling_notes"] and "bfloat16" not in result["ceiling_samples"]
    assert {m["dtype"] for m in result["methods"].values()} == {"float32"}
    assert "not" in (out / "results.md").read_text().split("Matmul ceiling", 1)[1].split("\n")[0]
