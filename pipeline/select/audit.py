"""The selection audit: which protocol and rule choose candidates that hold up on test.

This is the one place where test is read to judge the method, never to pick a result. For each
protocol (`validation`: fit on train, score on the carved validation split; `cv`: k folds of train)
the score and fuse searches run as in their stages, and each rule (`best`, `one_se`) chooses each
model's best layer, its best within-model fusion, the multi-model fusion and the overall candidate.
Every chosen candidate, and the top candidates of each leaderboard, is then fitted on train, with the
ridge penalty its own selection rows chose, and scored on test with the same probe. Regret = the best test score among the top candidates minus the
chosen one's. The protocols' costs are their measured seconds.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from pipeline.select.fusion import BlockScorer, Candidate, SearchResult, candidate_key, search_dataset
from pipeline.select.probe import Protocol, evaluate_features
from pipeline.core.records import LeaderboardRow
from pipeline.select.scoring import LayerBank, load_bank, score_layers
from pipeline.select.selection import RULES, choose
from pipeline.store.reader import open_store

PROTOCOLS = ("validation", "cv")
TOP = 10                    # leaderboard candidates per protocol scored on test for the regret


class TestJudge:
    """Scores any leaderboard row on test: the probe fitted on train (same basis, same alphas)."""

    __test__ = False

    def __init__(self, embeddings_root, dataset: str, protocol: Protocol):
        self.embeddings_root, self.dataset, self.protocol = embeddings_root, dataset, replace(protocol, name="validation")
        self.banks: dict[tuple[str, str], tuple[LayerBank, BlockScorer]] = {}
        self.cache: dict[str, dict[str, float]] = {}

    def _scorer(self, model: str, pooling: str) -> tuple[LayerBank, BlockScorer]:
        if (model, pooling) not in self.banks:
            store = open_store(self.embeddings_root, model, self.dataset)
            bank = load_bank(store, pooling, self.protocol, keep_standardised=True, model=model, judge_on_test=True)
            self.banks[(model, pooling)] = bank, BlockScorer(bank, self.protocol)
        return self.banks[(model, pooling)]

    def features(self, group: dict[str, Any]) -> torch.Tensor:
        _, scorer = self._scorer(group["model"], group["pooling"])
        operator = group["operator"] if len(group["layers"]) > 1 else "mean"
        return scorer.features(Candidate(tuple(group["layers"]), operator, "judged"))

    def score(self, row: LeaderboardRow) -> dict[str, float]:
        """Test accuracy and macro-F1 of a leaderboard row: the probe refitted on train with the ridge penalty
        the row's own selection rows chose (`row.alpha`), then only scored on test. Test picks nothing, not
        even alpha (cached by candidate and alpha)."""
        key = f"{row.candidate}@{row.alpha!r}"
        if key not in self.cache:
            groups = row.groups
            X = torch.cat([self.features(g) for g in groups], dim=1)
            bank, _ = self._scorer(groups[0]["model"], groups[0]["pooling"])
            result = evaluate_features(X, bank.folds, replace(self.protocol, alphas=(row.alpha,)))
            self.cache[key] = {"test_accuracy": round(result["accuracy"], 5),
                               "test_macro_f1": round(result["macro_f1"], 5)}
        return self.cache[key]


def _selections(search: SearchResult, models: list[str]) -> dict[str, list[LeaderboardRow]]:
    """The candidate sets each choice is made from, as in the fuse stage."""
    board = search.leaderboard
    sets = {}
    for model in models:
        mine = [r for r in board if r.models == [model]]
        sets[f"{model}: best layer"] = [r for r in mine if len(r.layers) == 1]
        sets[f"{model}: best fusion"] = [r for r in mine if len(r.layers) > 1] or sets[f"{model}: best layer"]
    multi = [r for r in board if r.family == "multi-model"]
    if multi:
        sets["multi-model"] = multi
    sets["overall"] = board
    return sets


def _brief(row: LeaderboardRow) -> dict[str, Any]:
    return {"candidate": row.candidate, "layers": row.layers, "score": round(row.score, 5)}


def audit_dataset(embeddings_root, dataset: str, models: list[str], protocol: Protocol,
                  fuse: dict[str, Any]) -> dict[str, Any]:
    """Both protocols x both rules on one dataset, judged on test."""
    judge = TestJudge(embeddings_root, dataset, protocol)
    out: dict[str, Any] = {"dataset": dataset, "models": models, "metric": protocol.metric, "top": TOP,
                           "protocols": {}}
    for name in PROTOCOLS:
        chosen_protocol = replace(protocol, name=name)
        start = time.perf_counter()
        scores = {m: score_layers(open_store(embeddings_root, m, dataset), chosen_protocol, m) for m in models}
        search = search_dataset(embeddings_root, dataset, models, scores, chosen_protocol, fuse)
        seconds = time.perf_counter() - start
        evidence = search.evidence
        sets = _selections(search, models)
        choices = {rule: {} for rule in RULES}
        for rule in RULES:
            for label, rows in sets.items():
                row = choose(rows, candidate_key, evidence, rule)
                choices[rule][label] = {**_brief(row), **judge.score(row)}
        top = {label: max(judge.score(r)["test_accuracy"] for r in sorted(rows, key=lambda r: -r.score)[:TOP])
               for label, rows in sets.items()}
        regret = {rule: {label: round(top[label] - choice["test_accuracy"], 5) for label, choice in picks.items()}
                  for rule, picks in choices.items()}
        layers = {m: {"pooling": search.chosen.models[m].pooling,
                      "test_by_layer": [judge.score(r)["test_accuracy"]
                                        for r in sorted(sets[f"{m}: best layer"], key=lambda r: r.layers[0])]}
                  for m in models}
        out["protocols"][name] = {"seconds": round(seconds, 2), "choices": choices, "top_test_accuracy": top,
                                  "regret": regret, "layers": layers,
                                  "score_seconds": {m: scores[m]["seconds"] for m in models}}
    return out


def summarise_audits(audits: list[dict[str, Any]]) -> dict[str, Any]:
    """Across corpora: mean test accuracy and regret of each protocol x rule's choices, and the winner."""
    table = {}
    for name in PROTOCOLS:
        for rule in RULES:
            tests, regrets = [], []
            for audit in audits:
                picks = audit["protocols"][name]["choices"][rule]
                tests += [pick["test_accuracy"] for pick in picks.values()]
                regrets += list(audit["protocols"][name]["regret"][rule].values())
            table[f"{name} / {rule}"] = {
                "protocol": name, "rule": rule, "choices": len(tests),
                "mean_test_accuracy": round(sum(tests) / max(len(tests), 1), 5),
                "mean_regret": round(sum(regrets) / max(len(regrets), 1), 5),
                "seconds": round(sum(a["protocols"][name]["seconds"] for a in audits), 1)}
    winner = max(table.values(), key=lambda row: (row["mean_test_accuracy"], -row["seconds"]))
    return {"table": table, "winner": winner}


def leave_one_corpus_out(audits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each corpus: the protocol / rule that the other corpora's audits choose (best mean test accuracy of
    their choices, as `summarise_audits`), judged on the left-out corpus against the one it would have chosen
    for itself. A method is confirmed where corpora that did not choose it agree; `cost` is what following the
    others' choice lost on the left-out corpus (points of mean test accuracy of the choices, >= 0)."""
    out = []
    for i, audit in enumerate(audits):
        others = audits[:i] + audits[i + 1:]
        if not others:
            continue
        chosen = summarise_audits(others)["winner"]
        own = summarise_audits([audit])
        name, best = f"{chosen['protocol']} / {chosen['rule']}", own["winner"]
        own_name = f"{best['protocol']} / {best['rule']}"
        followed = own["table"][name]["mean_test_accuracy"]
        out.append({"dataset": audit["dataset"], "chosen_by_others": name, "own_best": own_name,
                    "agrees": name == own_name, "followed_test_accuracy": followed,
                    "own_best_test_accuracy": best["mean_test_accuracy"],
                    "cost": round(best["mean_test_accuracy"] - followed, 5)})
    return out
