"""Stage compare: every head type of one dataset in one table, into store/compare/<dataset>: 95% test intervals,
paired tests on the same test rows (against the baselines, and between heads on identical inputs) with Holm's
correction, from the predictions the train stages saved. Trains nothing and reads no vectors: seconds.
"""

import time
from pathlib import Path

from pipeline.core.atomic import staged_folder, write_json_atomic
from pipeline.core.records import HeadResults, chosen_on_validation, read_json
from pipeline.store.resources import resources_of
from pipeline.heads.comparison import compare_heads
from stages import dataset_stage, run_stage


def main() -> None:
    args, params, start = dataset_stage(__doc__)
    heads = Path(params.store) / "heads" / args.dataset
    result = compare_heads(heads, args.dataset, params.train.as_dict())
    result["stage_seconds"] = round(time.perf_counter() - start, 3)
    table = HeadResults.from_json(result, "compare")
    chosen = chosen_on_validation(table.results)
    gates = heads / "gated" / "gate_weights.json"
    models = list(dict.fromkeys(g["model"] for row in table.results for g in row.groups))
    with staged_folder(Path(params.store) / "compare" / args.dataset) as staged:
        write_json_atomic(staged / "resources.json", resources_of(params.embeddings_root, args.dataset, models))
        write_json_atomic(staged / "gate_weights.json", read_json(gates) if gates.is_file() else [])
        write_json_atomic(staged / "results.json", result)
    for row in table.results:
        print(f"compare {args.dataset}: {row.row:<40} {row.head:<12} test accuracy {row.test_accuracy:.4f} "
              f"[{row.test_accuracy_low:.4f}, {row.test_accuracy_high:.4f}] (validation {row.validation_accuracy:.4f})")
    print(f"compare {args.dataset}: chosen on validation: {chosen.row} / {chosen.head}; {result['stage_seconds']:.1f}s")


if __name__ == "__main__":
    run_stage(main)
