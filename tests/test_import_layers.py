"""Imports point one way (issues 12 and 20), between packages: core -> hidden_states -> config -> sources
-> store -> extract -> select -> heads -> report. The layer order and the graph live in import_graph.py."""

from __future__ import annotations

from pathlib import Path

from import_graph import ALLOWED_UPWARD, LAYERS, draw, edges, imported_nodes, sources, upward


def test_every_module_has_a_layer():
    unplaced = sorted(set(sources()) - set(LAYERS))
    assert not unplaced, f"place these packages in tests/import_graph.py LAYERS: {unplaced}"


def test_no_import_points_upward():
    all_edges = edges()
    bad = [f"{a} imports {b}" for a, b in upward(all_edges) if (a, b) not in ALLOWED_UPWARD]
    assert not bad, "upward imports (a lower layer uses a higher one):\n" + "\n".join(bad)
    stale = [pair for pair in ALLOWED_UPWARD if pair not in all_edges]
    assert not stale, f"allowed upward edges that no longer exist, remove them: {stale}"


def test_an_upward_import_is_caught(tmp_path):
    """A store module that imported the report (even lazily, inside a function) would be named."""
    fake = tmp_path / "store.py"
    fake.write_text("def size():\n    from pipeline.report.dataset_report import write_report\n    import pipeline.bench.common\n")
    found = imported_nodes(fake)
    assert found == {"report", "bench"}
    assert upward({("store", b) for b in found}) == [("store", "bench"), ("store", "report")]
    assert upward({("report", "store")}) == []


def test_the_graph_is_drawn_as_a_png(tmp_path):
    target = tmp_path / "graph.png"
    draw(target)
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert ("stages", "config") in edges() and ("store", "core") in edges() and ("select", "store") in edges()
