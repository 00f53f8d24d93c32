"""Stage audit (the study's, not dvc.yaml's): which selection protocol and rule hold up on test, for one
dataset, into store/audit/<dataset>/audit.json.

The only reader of test besides `train`, and it chooses nothing: it judges how the project chooses
(pipeline/select/audit.py).
"""

import time
from pathlib import Path

from pipeline.core.atomic import staged_folder, write_json_atomic
from pipeline.select.audit import audit_dataset
from pipeline.select.fusion import fuse_settings
from pipeline.select.probe import protocol_from_params
from stages import dataset_stage, run_stage


def main() -> None:
    args, params, start = dataset_stage(__doc__)
    result = audit_dataset(params.embeddings_root, args.dataset, params.selected_models, protocol_from_params(params.score),
                           fuse_settings(params.fuse))
    result["stage_seconds"] = round(time.perf_counter() - start, 3)
    with staged_folder(Path(params.store) / "audit" / args.dataset) as staged:
        write_json_atomic(staged / "audit.json", result)
    for name, protocol in result["protocols"].items():
        for rule, picks in protocol["choices"].items():
            overall = picks["overall"]
            print(f"audit {args.dataset} {name:<10} {rule:<6}: chose {overall['candidate']} (probe {overall['score']:.4f},"
                  f" test {overall['test_accuracy']:.4f}, regret {protocol['regret'][rule]['overall']:+.4f}); "
                  f"{protocol['seconds']:.0f}s")


if __name__ == "__main__":
    run_stage(main)
