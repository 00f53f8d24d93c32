"""Stage train: Lightning heads on the chosen fusions and baselines of one dataset, into store/heads/<dataset>.

The only stage that reads the test split, once per trained head, after training.
"""

import json
import time
from pathlib import Path

from pipeline.atomic import staged_folder, write_json_atomic
from pipeline.resources import resources_of
from pipeline.training import quiet_lightning, train_dataset, train_settings
from stages import dataset_stage, run_stage


def main() -> None:
    args, params, start = dataset_stage(__doc__)
    quiet_lightning()
    settings = train_settings(params.train)
    chosen = json.loads((Path(params.store) / "fusion" / args.dataset / "chosen.json").read_text())
    out = Path(params.store) / "heads" / args.dataset
    with staged_folder(out) as staged:      # every head, seed and result replaces the old set in one step
        result = train_dataset(params.embeddings_root, args.dataset, chosen, settings, staged)
        result["stage_seconds"] = round(time.perf_counter() - start, 3)
        write_json_atomic(staged / "resources.json", resources_of(params.embeddings_root, args.dataset, list(chosen["models"])))
        write_json_atomic(staged / "results.json", result)
    for row in result["results"]:
        print(f"train {args.dataset}: {row['row']:<40} {row['head']:<12} test accuracy "
              f"{row['test_accuracy']:.4f} ± {row['test_accuracy_std']:.4f} (validation {row['validation_accuracy']:.4f})")
    print(f"train {args.dataset}: {result['stage_seconds']:.1f}s")


if __name__ == "__main__":
    run_stage(main)
