"""Stage score: the probe on every pooling x layer of one model x dataset, into store/scores/<dataset>/<model>.

Reads train and validation (protocol `validation`) or train alone (protocol `cv`); never test.
"""

import time
from pathlib import Path

from pipeline.config.params import load_params
from pipeline.select.probe import protocol_from_params
from pipeline.report.plots import plot_layer_scores, write_layer_csv
from pipeline.select.scoring import score_layers
from pipeline.store.reader import open_store
from pipeline.core.atomic import staged_folder, write_json_atomic
from pipeline.core.records import as_json
from stages import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    params = load_params(args.params, models=[args.model], datasets=[args.dataset])
    protocol = protocol_from_params(params.score)
    store = open_store(params.embeddings_root, args.model, args.dataset)
    result = score_layers(store, protocol, args.model, geometry_rows=params.score.geometry_rows,
                          importance_rows=params.score.importance_rows)
    out = Path(params.store) / "scores" / args.dataset / args.model
    result["dataset"] = args.dataset
    result["stage_seconds"] = round(time.perf_counter() - start, 3)
    with staged_folder(out) as staged:      # the three files replace the old three in one step
        write_layer_csv(staged / "layers.csv", result)
        plot_layer_scores(staged / "layers.png", {args.model: result}, title=f"{args.model} on {args.dataset}")
        write_json_atomic(staged / "scores.json", as_json(result))
    best, last = result["best"], result["last"]
    print(f"score {args.model} x {args.dataset}: best pooling {result['best_pooling']}, best layer {best.layer} "
          f"({protocol.metric} {best.score:.4f}) vs last layer {last.layer} ({last.score:.4f}); "
          f"{len(result['rows'])} probes in {result['stage_seconds']:.1f}s")


if __name__ == "__main__":
    run_stage(main)
