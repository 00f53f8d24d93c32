"""Stage extract: one model x one dataset, all layers and poolings, into store/embeddings/<dataset>/<model>,
or where paths.embeddings says (then that folder holds the store's record: pipeline/store/record.py)."""

import os
from pathlib import Path

from pipeline.extract import distributed
from pipeline.config.params import load_params
from pipeline.core.devices import resolve_device
from pipeline.extract.driver import extract
from pipeline.core.location import is_url
from pipeline.store.record import check_record_folder, record_folder, write_record
from stages import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--rebuild", action="store_true", help="delete a store written with other settings")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--wait", action="store_true", help="if another process writes this store, wait for it")
    args = parser.parse_args()
    params = load_params(args.params, models=[args.model], datasets=[args.dataset])
    resolve_device(params.extract.device)       # a GPU this machine lacks: named before any rank starts
    where, record = params.embeddings_path(args.model, args.dataset), record_folder(params.store, args.model, args.dataset)
    if is_url(where) or Path(where).resolve() != record.resolve():   # the store lives elsewhere: record it
        check_record_folder(record, where)      # before any work: a local store in the way is refused
    else:
        record = None
    if distributed.requested(params.extract):   # extract.devices/num_nodes > 1, or started by torchrun
        distributed.extract_distributed(params, args.model, args.dataset, rebuild=args.rebuild,
                                        show_progress=not args.no_progress, wait_for_lock=args.wait)
    else:
        extract(params, args.model, args.dataset, rebuild=args.rebuild, show_progress=not args.no_progress,
                wait_for_lock=args.wait)
    if record is not None and int(os.environ.get("RANK", "0")) == 0:
        write_record(record, where)


if __name__ == "__main__":
    run_stage(main)
