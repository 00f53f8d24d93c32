"""The cross-corpus study report (`make study`): reports/study/study.md, its figures and study.json.

It reads the stage outputs of the study's store (scores, fusion, heads, audit, prepared corpora) and
computes nothing new except summaries: which layer each model prefers on each corpus, how the last
layer, the best layer and the chosen fusions do on test (linear head, 95% intervals, paired tests),
whether complementary models help, and how the selection protocols and rules fared on test (audit).
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from pipeline.select.audit import leave_one_corpus_out, summarise_audits
from pipeline.report.dataset_report import not_run_yet
from pipeline.report.layer_report import study_layer_scores
from pipeline.core.machine import cpu_isa, cpu_model
from pipeline.report.plots import _save, plt
from pipeline.core.records import ChosenFusion, HeadResult, HeadResults, read_json, read_record, read_scores
from pipeline.select.significance import verdict

T = TypeVar("T")

HEAD = "linear"           # the cross-corpus table's head: the simplest, so differences are the inputs'


def _read(path: Path, reader: Callable[[Path], T] = read_json) -> T | None:
    """A stage's result file through its reader (records: a damaged file is named), None where it has not run."""
    return reader(path) if path.is_file() else None


def _chosen(path: Path) -> ChosenFusion:
    return read_record(path, ChosenFusion)


def _heads(path: Path) -> HeadResults:
    return read_record(path, HeadResults)


def _row(heads: HeadResults | None, row: str, head: str = HEAD) -> HeadResult | None:
    return next((r for r in (heads.results if heads else []) if r.row == row and r.head == head), None)


def _test_cell(row: HeadResult | None, against: str | None = None) -> str:
    if row is None:
        return "–"
    cell = f"{row.test_accuracy:.3f} [{row.test_accuracy_low:.3f}, {row.test_accuracy_high:.3f}]"
    test = row.paired_tests.get(against) if against else None
    if test is not None:
        cell += f" {100 * test['diff']:+.1f}{'*' if test['significant'] else ''}"
    return cell


def load_study(store: Path, models: list[str], datasets: list[str]) -> dict[str, Any]:
    """Every result file the report needs, per dataset (None where a stage has not run)."""
    out = {}
    for dataset in datasets:
        out[dataset] = {
            "meta": _read(store / "data" / dataset / "meta.json"),
            "scores": {m: _read(store / "scores" / dataset / m / "scores.json", read_scores) for m in models},
            "chosen": _read(store / "fusion" / dataset / "chosen.json", _chosen),
            "heads": _read(store / "compare" / dataset / "results.json", _heads),
            "audit": _read(store / "audit" / dataset / "audit.json"),
        }
    return out


def cross_corpus_table(study: dict[str, Any], models: list[str]) -> list[str]:
    lines = ["## Cross-corpus table", "",
             f"Test accuracy of the `{HEAD}` head (mean over seeds) with its 95% interval over test rows; after it, "
             "the paired difference in points to the model's last layer (* significant at 5%). The best layer is "
             "the one the selection rule picks on validation (its relative depth in brackets).", "",
             "| corpus | model | best layer (depth) | last layer | best layer | chosen within-model fusion | "
             "multi-model fusion |", "|---|---|---|---|---|---|---|"]
    for dataset, parts in study.items():
        heads, chosen = parts["heads"], parts["chosen"]
        multi = _row(heads, "multi-model: best fusion")
        for i, model in enumerate(models):
            info = chosen.models.get(model) if chosen else None
            if info is None:
                continue
            layer = info.best_layer.layers[0]
            depth = layer / max(info.num_layers - 1, 1)
            lines.append(f"| {dataset if i == 0 else ''} | {model} | {layer} of {info.num_layers - 1} ({depth:.2f}) | "
                         f"{_test_cell(_row(heads, f'{model}: last layer'))} | "
                         f"{_test_cell(_row(heads, f'{model}: best single layer'), 'last layer')} | "
                         f"{_test_cell(_row(heads, f'{model}: best within-model fusion'), 'last layer')} | "
                         f"{_test_cell(multi, 'last layer') if i == 0 else ''} |")
    return lines + [""]


def heatmaps(study: dict[str, Any], models: list[str], figures: Path) -> list[str]:
    """Per model: probe score (best pooling) over relative depth x corpus, as points below each corpus's best."""
    lines = ["## Where the good layers are", "",
             "Per model, the probe score of every layer (validation, each corpus's best pooling) in points below "
             "that corpus's best layer: 0 is the best layer.", ""]
    bins = np.linspace(0, 1, 11)
    for model in models:
        rows, names = [], []
        for dataset, parts in study.items():
            result = parts["scores"].get(model)
            if result is None:
                continue
            pooled = sorted((r for r in result["rows"] if r.pooling == result["best_pooling"]), key=lambda r: r.layer)
            depth = np.array([r.relative_depth for r in pooled])
            score = np.array([r.score for r in pooled])
            rows.append(100 * (np.interp(bins, depth, score) - score.max()))
            names.append(dataset)
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
        image = ax.imshow(np.array(rows), aspect="auto", cmap="viridis", vmin=min(-10, np.min(rows)), vmax=0)
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(bins)), [f"{b:.1f}" for b in bins])
        ax.set_xlabel("relative depth (0 = embeddings, 1 = last layer)")
        ax.set_title(f"{model}: probe score, points below each corpus's best layer")
        for (i, j), value in np.ndenumerate(np.array(rows)):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < -5 else "black")
        fig.colorbar(image, ax=ax, label="points")
        _save(fig, figures / f"heatmap_{model}.png")
        lines += [f"![{model}](study_figures/heatmap_{model}.png)", ""]
    return lines


def complementary_models(study: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    lines = ["## Do complementary models help?", "",
             f"For each corpus, the multi-model fusion against the best single model (the single-model row with the "
             f"best validation accuracy), `{HEAD}` head, paired on the same test rows.", ""]
    answers = {}
    for dataset, parts in study.items():
        multi = _row(parts["heads"], "multi-model: best fusion")
        test = multi.paired_tests.get("best single model") if multi else None
        if test is None:
            continue
        answers[dataset] = test
        lines.append(f"- **{dataset}**: {parts['chosen'].best_multi.candidate}: "
                     f"{verdict(test, test['against'])}")
    significant = [d for d, t in answers.items() if t["significant"] and t["diff"] > 0]
    lines += ["", f"Significant gains on {len(significant)} of {len(answers)} corpora"
              + (f" ({', '.join(significant)})." if significant else "."), ""]
    return lines, answers


def selection_audit(study: dict[str, Any], default_protocol: str, default_rule: str,
                    now: tuple[str, str]) -> tuple[list[str], dict[str, Any]]:
    """The audit table across corpora; `default_*`: what the study's stages used; `now`: params' defaults."""
    audits = [parts["audit"] for parts in study.values() if parts["audit"]]
    if not audits:
        return ["## Selection audit", "", "Not run (the study pipeline's stage audit).", ""], {}
    summary = summarise_audits(audits)
    lines = ["## Which protocol and rule choose better (the audit)", "",
             "Each protocol (validation: fit on train, score on the carved validation split; cv: 5 folds of train) "
             "and each rule chose every model's best layer and best fusion, the multi-model fusion and the overall "
             "candidate on every corpus; every choice was then refitted on train, with the ridge penalty its own selection rows "
             "chose, and only scored on test by the same probe. "
             "This is the only use of test to judge the method; nothing is chosen on it.", "",
             "| protocol / rule | choices | mean test accuracy of the choices | mean regret | seconds (all corpora) |",
             "|---|---|---|---|---|"]
    for name, row in summary["table"].items():
        lines.append(f"| {name} | {row['choices']} | {row['mean_test_accuracy']:.4f} | {100 * row['mean_regret']:+.2f} pts "
                     f"| {row['seconds']:.0f} |")
    winner = summary["winner"]
    summary["leave_one_corpus_out"] = loco = leave_one_corpus_out(audits)
    lines += ["", f"Best: **{winner['protocol']} / {winner['rule']}**. The project's defaults now: "
              f"`score.protocol: {now[0]}`, `score.select_rule: {now[1]}`.", ""] + loco_section(loco) + [
              "### Selection regret per corpus", "",
              f"Test accuracy of the overall choice ({default_protocol} / {default_rule}) against the best test "
              f"accuracy among the top {audits[0]['top']} candidates of the leaderboard; reported, never used to choose.", "",
              "| corpus | chosen | probe score | test | best test among the top | regret |", "|---|---|---|---|---|---|"]
    for audit in audits:
        protocol = audit["protocols"][default_protocol]
        pick = protocol["choices"][default_rule]["overall"]
        lines.append(f"| {audit['dataset']} | {pick['candidate']} | {pick['score']:.4f} | {pick['test_accuracy']:.4f} | "
                     f"{protocol['top_test_accuracy']['overall']:.4f} | {100 * protocol['regret'][default_rule]['overall']:+.1f} pts |")
    lines += ["", "Best single layer on validation against the best layer on test (same probe, fit on train):", "",
              "| corpus | model | chosen layer | its test | best layer on test | its test | cost |", "|---|---|---|---|---|---|---|"]
    for audit in audits:
        protocol = audit["protocols"][default_protocol]
        for model, info in protocol["layers"].items():
            by_layer = info["test_by_layer"]
            pick = protocol["choices"][default_rule][f"{model}: best layer"]
            top = int(np.argmax(by_layer))
            lines.append(f"| {audit['dataset']} | {model} | {pick['layers'][0]} | {pick['test_accuracy']:.4f} | {top} | "
                         f"{by_layer[top]:.4f} | {100 * (by_layer[top] - pick['test_accuracy']):.1f} pts |")
    return lines + [""], summary


def loco_section(loco: list[dict[str, Any]]) -> list[str]:
    """The defaults confirmed, or not, on corpora that did not choose them."""
    if not loco:
        return []
    lines = ["### Confirmed on corpora that did not choose it (leave one corpus out)", "",
             "For each corpus, the protocol and rule chosen on the other corpora's audits, judged on the left-out one: "
             "does it agree with what that corpus would have chosen for itself, and what did following the others cost "
             "there (points of the mean test accuracy of the choices)?", "",
             "| left-out corpus | chosen on the others | its own best | agrees | followed: test | own best: test | cost |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['chosen_by_others']} | {r['own_best']} | {'yes' if r['agrees'] else 'no'} | "
              f"{r['followed_test_accuracy']:.4f} | {r['own_best_test_accuracy']:.4f} | {100 * r['cost']:.2f} pts |"
              for r in loco]
    agree = sum(r["agrees"] for r in loco)
    return lines + ["", f"The others' choice agreed on {agree} of {len(loco)} left-out corpora; following it cost "
                    f"{100 * sum(r['cost'] for r in loco) / len(loco):.2f} points on average (at most "
                    f"{100 * max(r['cost'] for r in loco):.2f}).", ""]


def shape_section(study: dict[str, Any], max_len: dict[str, int]) -> list[str]:
    lines = ["## Corpora", "", "| corpus | rows (train / validation / test) | caps (rows before) | split | max_len |",
             "|---|---|---|---|---|"]
    for dataset, parts in study.items():
        meta = parts["meta"] or {}
        rows = meta.get("rows", {})
        caps = ", ".join(f"{s} {c['cap']} ({c['rows_before']})" for s, c in (meta.get("caps") or {}).items()) or "none"
        split = ("resplit from test: " + ", ".join(f"{k} {v}" for k, v in meta["resplit"].items() if k in ("train", "validation"))
                 if meta.get("resplit") else ("validation carved from train" if meta.get("carve") else "as shipped"))
        lines.append(f"| {dataset} | {rows.get('train', '–')} / {rows.get('validation', '–')} / {rows.get('test', '–')} | {caps} | {split} | "
                     f"{max_len[dataset]} |")
    return lines + [""]


def write_study_report(params, out: Path, other_stores: list[Path] | None = None) -> Path:
    """study.md, figures/ and study.json under `out`."""
    store, models, datasets = Path(params.store), params.selected_models, params.selected_datasets
    loaded = load_study(store, models, datasets)
    # a study runs corpus by corpus: every section covers the corpora whose heads are compared, the rest are named
    study = {d: parts for d, parts in loaded.items() if parts["heads"] is not None}
    pending = [d for d in loaded if d not in study]
    ran = [(p["chosen"].protocol, p["chosen"].select_rule) for p in study.values() if p["chosen"]]
    used = ran[0] if ran else (params.score.protocol, params.score.select_rule)
    figures = out / "study_figures"   # beside the report stage's figures/, which the swap keeps
    figures.mkdir(parents=True, exist_ok=True)
    lines = ["# The study: every shipped corpus through every shipped model", "",
             f"Generated by the study's DVC pipeline ({_which(params)}) on {cpu_model()} "
             f"({cpu_isa()}). The study's score, fuse and train stages selected with `score.protocol: {used[0]}` "
             f"and `score.select_rule: {used[1]}` (the defaults when it ran); test was read once per trained head, "
             f"and by the audit to judge the method.", ""]
    lines += not_run_yet(pending)
    lines += shape_section(study, {d: params.extract_for(d).max_len for d in datasets}) + cross_corpus_table(study, models) + heatmaps(study, models, figures)
    complementary, answers = complementary_models(study)
    audit_lines, summary = selection_audit(study, *used, (params.score.protocol, params.score.select_rule))
    lines += complementary + audit_lines + (cap_effect(study, models, other_stores) if other_stores else [])
    score_lines, layer_summary = study_layer_scores(study, models)
    lines += score_lines
    from pipeline.core.atomic import write_json_atomic, write_text_atomic
    write_json_atomic(out / "study.json", {"complementary": answers, "audit": summary, "layer_scores": layer_summary,
                                           "best_layers": {d: {m: _best_layers(p["chosen"], m) for m in models}
                                                           for d, p in study.items()}})
    write_text_atomic(out / "study.md", "\n".join(lines))
    return out / "study.md"


def _which(params) -> str:
    """How this run was made: at full size (`make study`) or capped (`make study-capped`)."""
    capped = bool(getattr(getattr(params, "data", None), "max_rows", None))
    return "`make study-capped`, profile `study_capped.yaml`" if capped else "`make study`, profile `study.yaml`, full corpora"


def _best_layers(chosen: ChosenFusion | None, model: str) -> list[int] | None:
    """The layers of the model's chosen best single layer, None where the fuse stage has not chosen one."""
    info = chosen.models.get(model) if chosen else None
    return info.best_layer.layers if info else None


def _capped(meta: dict[str, Any] | None) -> bool:
    return bool((meta or {}).get("caps"))


def _side(store: Path, dataset: str, model: str) -> dict[str, Any]:
    """What the caps table reads of another run of a corpus: its meta, the model's scores and the compared heads."""
    return {"meta": _read(store / "data" / dataset / "meta.json"),
            "scores": {model: _read(store / "scores" / dataset / model / "scores.json", read_scores)},
            "heads": _read(store / "compare" / dataset / "results.json", _heads)}


def cap_effect(study: dict[str, Any], models: list[str], other_stores: list[Path]) -> list[str]:
    """This study against another run of the same corpus and model where exactly one of the two is capped (the
    capped study's store, the full-size study's, the default run's): the rows trained on, the layer the probe
    ranks first, and the test accuracy of the last layer's and the chosen best layer's linear heads. The first
    store holding that corpus's scores on the other side of the caps serves it."""
    lines = ["## What the caps change", "",
             "The same corpus capped and at full size, where both runs exist (this study's store and "
             + ", ".join(f"`{os.path.relpath(s)}`" for s in other_stores) + "): train rows, the layer the probe ranks "
             "first (its score), and the test accuracy of the linear head on the last layer and on the best layer "
             "chosen on validation (mean of the seeds).", "",
             "| corpus | model | train rows: capped / full | top layer (score): capped | full | "
             "last layer, test: capped | full | best layer, test: capped | full |",
             "|---|---|---|---|---|---|---|---|---|"]
    found = False
    for dataset, parts in study.items():
        for model in models:
            if not parts["scores"].get(model) or parts["meta"] is None:    # meta None: caps unknown
                continue
            other = next((o for o in (_side(s, dataset, model) for s in other_stores)
                          if o["scores"][model] and o["meta"] is not None
                          and _capped(o["meta"]) != _capped(parts["meta"])), None)
            if other is None:
                continue
            found = True
            capped, full = (parts, other) if _capped(parts["meta"]) else (other, parts)
            rows = [side["meta"].get("rows", {}).get("train", "–") for side in (capped, full)]
            cells = [_accuracy(_row(side["heads"], f"{model}: {kind}")) for kind in ("last layer", "best single layer")
                     for side in (capped, full)]
            tops = [side["scores"][model]["best"] for side in (capped, full)]
            lines.append(f"| {dataset} | {model} | {rows[0]} / {rows[1]} | "
                         + " | ".join(f"{top.layer} ({top.score:.4f})" for top in tops) + " | " + " | ".join(cells) + " |")
    return lines + [""] if found else []


def _accuracy(row: HeadResult | None) -> str:
    return "–" if row is None else f"{row.test_accuracy:.3f}"
