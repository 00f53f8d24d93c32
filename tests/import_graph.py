"""pipeline's package import graph, ordered by layer: an import from a lower package to a higher one
is an upward edge (modules within one package may import each other). Draw it (upward edges in red):

    .venv/bin/python tests/import_graph.py reports/import_graph.png

Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# lowest first; a package may import only packages listed before it
LAYERS = (
    "core",           # errors, records, atomic writes, locations, fingerprints, devices, lock
    "hidden_states",  # attention, layer tap, pooling, batching: how a model's states are read
    "config",         # params.yaml, typed and checked
    "sources",        # corpora and model weights
    "store",          # Stage 1's Zarr store: writer, reader, verify, record
    "extract",        # Stage 1: the driver, forward passes, scale-out
    "select",         # Stage 2: probe, layer scores, selection, fusion, audit
    "heads",          # Stage 2: heads, training, comparison, predict, export, cost
    "report",         # reports, plots, the recommendation
    "cli",            # python -m pipeline
    "bench",          # pipeline/bench/*: benchmark tools, above everything they measure
    "stages",         # the DVC stages: entry points, never imported by pipeline
)
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}   # (importer, imported): why it cannot point down yet


def node_of(module: str) -> str | None:
    """'pipeline.bench.common' -> 'bench', 'pipeline.store.reader' -> 'store', 'pipeline.config.params' -> 'config',
    'stages.x' -> 'stages'."""
    parts = module.split(".")
    if parts[0] == "stages":
        return "stages"
    if parts[0] != "pipeline" or len(parts) < 2 or parts[1] in ("__init__", "__main__"):
        return None
    return parts[1]


def sources() -> dict[str, list[Path]]:
    """Files per graph node."""
    out: dict[str, list[Path]] = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        node = node_of(module)
        if node:
            out.setdefault(node, []).append(path)
    out["stages"] = sorted((REPO / "stages").glob("*.py"))
    return out


def imported_nodes(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in map(node_of, names) if n}
    return found


def edges() -> set[tuple[str, str]]:
    """(importer, imported) between different nodes."""
    return {(node, target) for node, files in sources().items() for path in files
            for target in imported_nodes(path) if target != node}


def upward(all_edges: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """Edges from a lower layer to a higher one (modules without a layer are test_every_module_has_a_layer's)."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted((a, b) for a, b in all_edges if a in rank and b in rank and rank[a] < rank[b])


def draw(path: Path) -> None:
    """One row per layer, lowest at the bottom; downward edges grey, upward edges red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    all_edges = {(a, b) for a, b in edges() if a in LAYERS and b in LAYERS}
    up = set(upward(all_edges))
    where = {name: ((i % 4) * 1.0 + (0.5 if (i // 4) % 2 else 0.0), i) for i, name in enumerate(LAYERS)}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(LAYERS)))
    for a, b in sorted(all_edges):
        (x0, y0), (x1, y1) = where[a], where[b]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops={"arrowstyle": "->", "lw": 1.6 if (a, b) in up else 0.5,
                                "color": "red" if (a, b) in up else "0.7", "connectionstyle": "arc3,rad=0.15"})
    for name, (x, y) in where.items():
        ax.text(x, y, name, ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": "white", "ec": "black", "lw": 0.6})
    ax.set_xlim(-0.6, 4.1)
    ax.set_ylim(-1, len(LAYERS))
    ax.axis("off")
    ax.set_title(f"pipeline imports by layer (lowest at the bottom): {len(all_edges)} edges, {len(up)} upward (red)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "import_graph.png")
    draw(target)
    print(f"{target}: upward edges {upward(edges()) or 'none'}")
