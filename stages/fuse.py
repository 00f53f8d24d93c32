"""Stage fuse: the exhaustive fusion search of one dataset over the selected models, into store/fusion/<dataset>.

Reads the score stage's tables and the train/validation layer slices it needs; never test.
"""

import csv
import io
import json
import time
from pathlib import Path

from pipeline.core.atomic import staged_folder, write_json_atomic, write_text_atomic
from pipeline.select.fusion import fuse_settings, search_dataset
from pipeline.select.probe import protocol_from_params
from pipeline.core.records import LeaderboardRow, read_scores
from stages import dataset_stage, run_stage

COLUMNS = ["rank", "candidate", "family", "operator", "layers", "models", "pooling", "width", "score", "std",
           "accuracy", "accuracy_std", "macro_f1", "macro_f1_std", "vs_reference", "vs_reference_low",
           "vs_reference_high", "vs_leader", "vs_leader_se", "within_one_se", "alpha", "seconds"]


def leaderboard_csv(rows: list[LeaderboardRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rank, row in enumerate(rows, 1):
        fields = row.to_json()
        writer.writerow({**fields, "rank": rank, "layers": json.dumps(row.layers), "models": "+".join(row.models),
                         "pooling": json.dumps(row.pooling) if isinstance(row.pooling, list) else row.pooling,
                         **{k: round(fields[k], 5) for k in ("score", "std", "accuracy", "accuracy_std", "macro_f1",
                                                             "macro_f1_std")}})
    return buffer.getvalue()


def main() -> None:
    args, params, start = dataset_stage(__doc__)
    protocol, settings = protocol_from_params(params.score), fuse_settings(params.fuse)
    scores = {m: read_scores(Path(params.store) / "scores" / args.dataset / m / "scores.json")
              for m in params.selected_models}
    search = search_dataset(params.embeddings_root, args.dataset, params.selected_models, scores, protocol, settings)
    out = Path(params.store) / "fusion" / args.dataset
    result = search.chosen
    result.stage_seconds = round(time.perf_counter() - start, 3)
    result.note = ("within-model candidates use each model's best pooling on validation "
                   "(score stage); scores are the probe's, on " +
                   ("validation" if protocol.name == "validation" else f"{protocol.folds}-fold CV of train"))
    with staged_folder(out) as staged:      # leaderboard and choice replace the old ones in one step
        write_text_atomic(staged / "leaderboard.csv", leaderboard_csv(search.leaderboard))
        write_json_atomic(staged / "leaderboard.json", [row.to_json() for row in search.leaderboard])
        write_json_atomic(staged / "chosen.json", result.to_json())
    for model, t in result.timing.items():
        print(f"fuse {args.dataset} x {model}: {t['candidates']} candidates in {t['search_seconds']:.1f}s "
              f"= {t['candidates_per_s']:.1f} candidates/s")
    print(f"fuse {args.dataset}: chosen {result.chosen.candidate} ({protocol.metric} {result.chosen.score:.4f}); "
          f"stage {result.stage_seconds:.1f}s")


if __name__ == "__main__":
    run_stage(main)
