"""`layerfuse` / `python -m pipeline`: commands for people (the DVC stages live in `stages/`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core import location
from pipeline.core.errors import EXIT_FAILURE, PipelineError, exit_status_on_signals, failure_exit_message, is_failure


def _store_paths(args) -> list[Path]:
    if args.paths:
        return [location.as_location(p) for p in args.paths]   # folders, or URLs (s3://...) kept as strings
    from pipeline.config.params import load_params
    params = load_params(args.params)
    return [params.embeddings_path(m, d) for d in params.selected_datasets for m in params.selected_models]


def cmd_inspect(args) -> int:
    from pipeline.store.inspect import summarise
    results = [summarise(path) for path in _store_paths(args)]
    return 0 if all(r["complete"] for r in results) else 1


def cmd_verify(args) -> int:
    """Exit 0: every store complete and intact; 1: problems (listed); with --repair, bad blocks are
    marked not done and the next extraction rebuilds exactly those."""
    from pipeline.store.verify import repair, verify_store
    status = 0
    for path in _store_paths(args):
        problems = verify_store(path)
        if not problems:
            print(f"{path}: OK (complete; every block's checksum and values verified)")
            continue
        status = 1
        print(f"{path}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        serious = [p for p in problems if p.serious]
        if any(p.kind == "failure" for p in problems):
            print("  not judged: a read failed for a reason outside the store; nothing was marked or deleted"
                  + (" (--repair does nothing until verify reads the store whole)" if args.repair else ""))
        elif args.repair and (serious or any(p.kind == "leftover" for p in problems)):
            done = repair(path, serious)
            print(f"  repaired: {len(done['blocks'])} block(s) marked not done {done['blocks']}, "
                  f"split(s) to recreate {done['splits']}, {done['temporary_files_removed']} temporary file(s) "
                  f"removed; rerun the extraction (dvc repro, or python -m stages.extract --model M --dataset D) "
                  f"to rebuild exactly those")
            if done["cache_objects_removed"]:
                print(f"  the damaged files were linked into the DVC cache: {len(done['cache_objects_removed'])} "
                      f"damaged cache object(s) deleted, so DVC cannot link them back")
            if done["links_not_found"]:
                print(f"  warning: {done['links_not_found']} other hard link(s) of the damaged files were not found "
                      f"(a DVC cache outside .dvc/cache?); delete them, or DVC may link the damaged bytes back")
        elif serious:
            print("  rerun with --repair to mark the damaged blocks for re-extraction")
    return status


def _predictor(args):
    from pipeline.config.params import load_params
    from pipeline.core.devices import resolve_device
    from pipeline.heads.predict import Predictor
    resolve_device(args.device, "--device")       # a GPU this machine lacks: named before any loading
    options = {"device": args.device}
    if args.from_export:
        return Predictor.from_export(Path(args.from_export), **options), None, None
    params = load_params(args.params)
    dataset = args.dataset or (params.selected_datasets or [None])[0]
    predictor = Predictor.from_project(params.store, dataset, args.row, args.head, args.seed,
                                       embeddings_root=params.embeddings_root, token_budget=params.extract.token_budget, **options)
    return predictor, dataset, Path(params.store)


def _summary(store: Path, dataset: str, config: dict) -> str | None:
    """The report's one-line summary of the head predict uses: test figures, gain, blocks run, cost."""
    from pipeline.report.recommendation import summary_line
    from pipeline.core.records import CostResult, HeadResults, read_record
    results = read_record(store / "compare" / dataset / "results.json", HeadResults).results
    result = next((r for r in results if r.row == config["row"] and r.head == config["head"]), None)
    cost_path = store / "cost" / dataset / "cost.json"
    cost = read_record(cost_path, CostResult) if cost_path.is_file() else None
    return summary_line(dataset, result, cost) if result else None


def cmd_predict(args) -> int:
    """Write one JSON line per input: id, label, per-label probabilities, truncated (or id, error)."""
    import json
    from pipeline.heads.predict import read_records
    predictor, dataset, store = _predictor(args)
    print(f"head {predictor.head_dir} ({predictor.config['row']}, {predictor.config['head']}, "
          f"seed {predictor.config['seed']}); {predictor.describe()}", file=sys.stderr)
    if store is not None and (summary := _summary(store, dataset, predictor.config)):
        print(summary, file=sys.stderr)
    stdin = None if args.texts or args.file else sys.stdin.buffer
    records = read_records(args.texts, args.file, args.text_field, stream=stdin)
    results = (json.dumps(r, ensure_ascii=False) + "\n" for r in predictor.predict(records, bool(args.out)))
    if args.out:
        from pipeline.core.atomic import atomic_writer
        with atomic_writer(args.out, "w") as out:     # a killed run leaves no half output file
            out.writelines(results)
    else:
        sys.stdout.writelines(results)
    return 0


def cmd_export(args) -> int:
    from pipeline.heads.export import export
    predictor, dataset, _ = _predictor(args)
    folder = export(predictor, Path(args.out), dataset)
    print(f"exported {predictor.config['row']} / {predictor.config['head']} / seed {predictor.config['seed']} "
          f"to {folder}; run: layerfuse predict --from-export {folder} \"some text\"")
    return 0


def _seed(text: str) -> int | str:
    """--seed: a whole number or `best`; anything else is argparse's usage error (exit 2)."""
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or best, got {text!r}") from None


def _device(text: str) -> str:
    """--device: a device name (whether this machine has it is checked when the command runs)."""
    from pipeline.core.devices import DEVICE_NAMES, is_device_name
    if not is_device_name(text):
        raise argparse.ArgumentTypeError(f"must be {DEVICE_NAMES}, got {text!r}")
    return text


def _result_options(parser) -> None:
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", help="dataset whose heads to use (default: the first selected)")
    parser.add_argument("--row", help='which inputs, e.g. "multi-model: best fusion" (default: best on validation)')
    parser.add_argument("--head", help="linear | mlp | cooccurrence | scalar_mix | gated (default: best on validation)")
    parser.add_argument("--seed", default="best", type=_seed, help="a seed, or best (by validation accuracy)")
    parser.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N or mps")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerfuse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="summarise stores (default: every selected model x dataset)")
    inspect.add_argument("paths", nargs="*", help="store folders (store/embeddings/<dataset>/<model>)")
    inspect.add_argument("--params", default="params.yaml")
    inspect.set_defaults(run=cmd_inspect)
    verify = commands.add_parser("verify", help="check stores: shapes, completion, per-block checksums, finite values")
    verify.add_argument("paths", nargs="*", help="store folders (default: every selected model x dataset)")
    verify.add_argument("--params", default="params.yaml")
    verify.add_argument("--repair", action="store_true",
                        help="mark damaged blocks not done so the next extraction rebuilds exactly those")
    verify.set_defaults(run=cmd_verify)
    predict = commands.add_parser("predict", help="classify new texts with a trained head (JSON lines out)")
    predict.add_argument("texts", nargs="*", help="texts to classify (else --file, or standard input)")
    predict.add_argument("--file", help="a file of lines, or JSONL with --text-field; - for standard input")
    predict.add_argument("--text-field", help="read --file as JSONL and take the text from this field")
    predict.add_argument("--from-export", help="an exported classifier folder (instead of the project's heads)")
    predict.add_argument("--out", help="write JSON lines here (default: standard output)")
    _result_options(predict)
    predict.set_defaults(run=cmd_predict)
    export = commands.add_parser("export", help="write a self-contained classifier folder")
    export.add_argument("out", help="a new folder")
    _result_options(export)
    export.set_defaults(run=cmd_export, from_export=None)
    args = parser.parse_args(argv)
    with exit_status_on_signals():
        try:
            return args.run(args)
        except (PipelineError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except Exception as error:
            if not is_failure(error):
                raise
            print(f"error: {failure_exit_message(error)}", file=sys.stderr)
            return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
