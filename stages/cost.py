"""Stage cost: what every fusion candidate, and so every head, costs at predict time on this machine, into
store/cost/<dataset>/cost.json (pipeline/heads/predict_timing.py, pipeline/heads/cost.py).

Each model's predict path is timed at a few depths and a line is fitted; a configuration costs one pass per
model it reads, stopped after its deepest layer. The fuse stage's choice is also timed whole, a check of that
estimate. Nothing here depends on the heads, so a head experiment reruns no timing: the report prices the head
chosen on validation from these curves.

Test is read only by the audit's judge, for the fuse stage's choice and for the cheapest candidate within one
paired standard error of the top: reported beside each other, never used to choose.
"""

import time
from pathlib import Path

from pipeline.core.atomic import staged_folder, write_json_atomic
from pipeline.select.audit import TestJudge
from pipeline.sources.corpora import read_corpus
from pipeline.heads.cost import cheapest_within_one_se, deepest_layers, estimate_seconds
from pipeline.core.devices import resolve_device
from pipeline.core.machine import machine_in_words
from pipeline.heads.predict_timing import model_cost_curve
from pipeline.select.probe import protocol_from_params
from pipeline.core.records import ChosenFusion, LeaderboardRow, read_record, read_records
from pipeline.store.reader import open_store
from stages import dataset_stage, run_stage


def main() -> None:
    args, params, start = dataset_stage(__doc__)
    store, dataset, settings = Path(params.store), args.dataset, params.cost
    texts = read_corpus(store / "data" / dataset).splits["validation"].texts[:settings.texts]
    device, budget = resolve_device(params.extract.device), params.extract.token_budget
    board = read_records(store / "fusion" / dataset / "leaderboard.json", LeaderboardRow)
    rows = {row.candidate: row for row in board}
    chosen = read_record(store / "fusion" / dataset / "chosen.json", ChosenFusion).chosen.candidate
    reads: dict[str, dict[str, list[int]]] = {}          # model -> pooling -> layers of the fuse stage's choice
    for group in rows[chosen].groups:
        reads.setdefault(group["model"], {}).setdefault(group["pooling"], []).extend(group["layers"])
    curves = {model: model_cost_curve(open_store(params.embeddings_root, model, dataset), model, store / "models", texts,
                                      settings, device, budget, reads.get(model))
              for model in params.selected_models}

    candidates = [{"candidate": row.candidate, "family": row.family, "score": row.score, "vs_leader": row.vs_leader,
                   "vs_leader_se": row.vs_leader_se, "within_one_se": row.within_one_se,
                   "deepest": deepest_layers(row.groups), "seconds_per_1000": estimate_seconds(row.groups, curves)}
                  for row in board]
    choice = next(c for c in candidates if c["candidate"] == chosen)
    check = {"candidate": chosen, "deepest": choice["deepest"], "estimated_seconds_per_1000": choice["seconds_per_1000"],
             "measured_seconds_per_1000": round(sum(curves[m]["check_seconds_per_1000"] for m in reads), 4)}
    cheapest = cheapest_within_one_se(candidates)
    judge = TestJudge(params.embeddings_root, dataset, protocol_from_params(params.score))
    result = {"dataset": dataset, "machine": machine_in_words(device), "device": str(device), "texts": len(texts),
              "repeats": settings.repeats, "curves": curves, "check": check, "candidates": candidates,
              "choice": choice, "cheapest": cheapest, "choice_test": judge.score(rows[chosen]),
              "cheapest_test": judge.score(rows[cheapest["candidate"]]),
              "stage_seconds": round(time.perf_counter() - start, 3)}
    with staged_folder(store / "cost" / dataset) as staged:
        write_json_atomic(staged / "cost.json", result)
    print(f"cost {dataset}: {chosen}: {check['measured_seconds_per_1000']:.2f} s per 1,000 texts measured, "
          f"{check['estimated_seconds_per_1000']:.2f} estimated; cheapest within one SE of the top: "
          f"{cheapest['candidate']} at {cheapest['seconds_per_1000']:.2f} s; {result['machine']}; "
          f"{result['stage_seconds']:.0f}s")


if __name__ == "__main__":
    run_stage(main)
