"""Stage train: one head type (train.heads) on the chosen fusions and baselines of one dataset, every seed, into
store/heads/<dataset>/<head>. One stage per head type, so changing train.mlp retrains the MLP heads alone.

With stage compare, the only stages that read the test split: each head once, after training (its predictions
are saved beside it for compare's paired tests).
"""

import json
import time
from pathlib import Path

from pipeline.core.atomic import staged_folder, write_json_atomic
from pipeline.core.errors import ConfigError
from pipeline.heads.training import quiet_lightning, train_head, train_settings
from stages import dataset_stage, run_stage


def main() -> None:
    args, params, start = dataset_stage(__doc__, "head")
    if args.head not in params.train.heads:
        raise ConfigError(f"--head {args.head!r} is not in train.heads {list(params.train.heads)}")
    quiet_lightning()
    settings = train_settings(params.train)
    chosen = json.loads((Path(params.store) / "fusion" / args.dataset / "chosen.json").read_text())
    out = Path(params.store) / "heads" / args.dataset / args.head
    with staged_folder(out) as staged:      # every row, seed and result replaces the old set in one step
        result = train_head(params.embeddings_root, args.dataset, chosen, settings, args.head, staged)
        result["stage_seconds"] = round(time.perf_counter() - start, 3)
        write_json_atomic(staged / "results.json", result)
    for row in result["results"]:
        print(f"train {args.dataset} {args.head}: {row['row']:<40} validation accuracy "
              f"{row['validation_accuracy']:.4f} ± {row['validation_accuracy_std']:.4f} ({row['seconds']:.1f}s)")
    print(f"train {args.dataset} {args.head}: {result['stage_seconds']:.1f}s")


if __name__ == "__main__":
    run_stage(main)
