"""The fast probe shared by layer scoring and fusion search, so that their numbers compare.

A closed-form multi-output ridge classifier (one-hot targets, intercept) on standardised features.
It needs only sufficient statistics of the fit rows (X^T X, X^T Y, sums), so a candidate built
from precomputed blocks costs a small eigendecomposition, and every alpha and every fold is solved
at once from the same decomposition. Scores come from rows the probe never fit on: the validation
split (protocol `validation`) or the held-out fold (protocol `cv`, k folds on train). The test
split is never an input here.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.config.sections import ScoreSettings
from pipeline.core.errors import ConfigError, ProbeError

METRICS = ("accuracy", "macro_f1")
PREDICTIONS, ALPHA_INDEX = "_predictions", "_alpha_index"   # per-row held-out evidence; popped before JSON


@dataclass(frozen=True)
class Protocol:
    """How a probe is fitted and scored (params.yaml `score:`)."""
    name: str = "cv"                  # validation | cv
    folds: int = 5
    alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)   # relative to the mean eigenvalue of X^T X
    metric: str = "accuracy"
    rank: int = 128                   # features projected on this many principal directions (0: none)
    pca_rows: int = 2048
    bootstrap: int = 200              # validation protocol: std over bootstrap resamples of validation
    seed: int = 0
    select_rule: str = "best"         # best | one_se (pipeline/select/selection.py)


def protocol_from_params(score: ScoreSettings) -> Protocol:
    """The probe protocol of params.yaml's `score:` section (typed and validated by pipeline.config)."""
    return Protocol(name=score.protocol, folds=score.folds, alphas=tuple(score.alphas), metric=score.metric,
                    rank=score.rank, pca_rows=score.pca_rows, bootstrap=score.bootstrap, seed=score.seed,
                    select_rule=score.select_rule)


# -- rows and folds ---------------------------------------------------------------------------
@dataclass
class Folds:
    """Probe rows (train, then validation under protocol `validation`) and who fits / who scores.

    Under CV the probe rows are the train rows reordered by fold (`order[i]` is the train row at
    probe row i), so that every fold's held-out rows are one contiguous range (`bounds`): features
    of a fold are views, never gathered copies. `fit` and `eval` are index tensors into probe rows
    (or slices under protocol validation), usable with numpy and torch alike.
    """
    y: torch.Tensor                       # [N] labels of the probe rows
    fit: list[torch.Tensor | slice]       # per fold, rows fitted on (a slice: a view, no copy)
    eval: list[torch.Tensor | slice]      # per fold, rows scored on
    partition: bool                       # eval sets partition the rows and fit = complement (cv)
    boot: torch.Tensor | None             # [B, n_eval] resample counts (validation protocol)
    num_classes: int
    order: np.ndarray | None = None       # cv: probe row i is train row order[i]
    bounds: list[tuple[int, int]] | None = None   # cv: fold k holds out probe rows bounds[k][0]:bounds[k][1]

    def eval_slices(self) -> list[slice]:
        """Held-out rows of each fold as slices (contiguous by construction)."""
        if self.bounds is not None:
            return [slice(a, b) for a, b in self.bounds]
        return [e if isinstance(e, slice) else _as_slice(e) for e in self.eval]


def _as_slice(rows: torch.Tensor) -> slice:
    a, b = int(rows[0]), int(rows[-1]) + 1
    if b - a != len(rows):
        raise ValueError("held-out rows are not contiguous")
    return slice(a, b)


def stratified_folds(labels: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Each row's fold (0..folds-1): each class's rows shuffled and dealt round-robin from a random fold, so
    every fold holds each class's share within one row. The one splitter of Stage 2 (CV folds, the halves
    of the optimism estimate); corpora.py's carve and caps keep theirs, since their output names the corpus."""
    fold_of = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        fold_of[rows] = (np.arange(len(rows)) + rng.integers(folds)) % folds
    return fold_of


def make_folds(y_train: np.ndarray, y_validation: np.ndarray | None, protocol: Protocol,
               num_classes: int) -> Folds:
    """Validation: fit on train rows, score on validation rows. CV: stratified, seeded k folds of train."""
    rng = np.random.default_rng(protocol.seed)
    if protocol.name == "validation":
        if y_validation is None or len(y_validation) == 0:
            raise ConfigError("score.protocol is validation but the store has no validation rows; use cv")
        n_train, n_val = len(y_train), len(y_validation)
        y = torch.as_tensor(np.concatenate([y_train, y_validation]), dtype=torch.long)
        counts = rng.multinomial(n_val, np.full(n_val, 1.0 / n_val), size=protocol.bootstrap) \
            if protocol.bootstrap else None
        return Folds(y, [slice(0, n_train)], [slice(n_train, n_train + n_val)], False,
                     None if counts is None else torch.as_tensor(counts, dtype=torch.float32), num_classes)
    if protocol.folds > len(y_train):
        raise ConfigError(f"score.folds is {protocol.folds} but train has {len(y_train)} rows: every fold needs "
                          f"held-out rows; lower score.folds or use protocol validation")
    fold_of = stratified_folds(y_train, protocol.folds, rng)
    order = np.argsort(fold_of, kind="stable")     # probe rows grouped by fold, train order within
    sizes = np.bincount(fold_of, minlength=protocol.folds)
    if sizes.min() == 0:
        raise ConfigError(f"score.folds {protocol.folds} leaves a fold without rows ({len(y_train)} train rows): "
                          f"lower score.folds")
    ends = np.cumsum(sizes)
    bounds = [(int(e - n), int(e)) for n, e in zip(sizes, ends)]
    n = len(y_train)
    evals = [torch.arange(a, b) for a, b in bounds]
    fits = [torch.cat([torch.arange(0, a), torch.arange(b, n)]) for a, b in bounds]
    return Folds(torch.as_tensor(y_train[order], dtype=torch.long), fits, evals, True, None, num_classes,
                 order, bounds)


def held_out_labels(folds: Folds) -> torch.Tensor:
    """Labels of the scored rows in the order the probe's predictions come (fold by fold)."""
    return torch.cat([folds.y[e] for e in folds.eval_slices()])


# -- sufficient statistics ----------------------------------------------------------------------
@dataclass
class FitStats:
    """Per fold, uncentred statistics of the fit rows: G = X^T X, s = sum x, XtY, n, ysum."""
    G: torch.Tensor       # [K, w, w]
    s: torch.Tensor       # [K, w]
    XtY: torch.Tensor     # [K, w, C]
    n: torch.Tensor       # [K]
    ysum: torch.Tensor    # [K, C]


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, num_classes).to(torch.float32)


def fit_stats(X: torch.Tensor, folds: Folds) -> FitStats:
    """Statistics of every fold's fit rows; with CV, one pass over the rows serves all folds."""
    Y = one_hot(folds.y, folds.num_classes)
    if folds.partition:
        parts = [(X[e], Y[e]) for e in folds.eval_slices()]          # views: folds are contiguous
        G_e = torch.stack([x.T @ x for x, _ in parts])
        s_e = torch.stack([x.sum(0) for x, _ in parts])
        XtY_e = torch.stack([x.T @ y for x, y in parts])
        n_e = torch.tensor([float(x.shape[0]) for x, _ in parts])
        y_e = torch.stack([y.sum(0) for _, y in parts])
        return FitStats(G_e.sum(0) - G_e, s_e.sum(0) - s_e, XtY_e.sum(0) - XtY_e, n_e.sum() - n_e, y_e.sum(0) - y_e)
    parts = [(X[f], Y[f]) for f in folds.fit]
    return FitStats(torch.stack([x.T @ x for x, _ in parts]), torch.stack([x.sum(0) for x, _ in parts]),
                    torch.stack([x.T @ y for x, y in parts]),
                    torch.tensor([float(x.shape[0]) for x, _ in parts]), torch.stack([y.sum(0) for _, y in parts]))


# -- metrics -----------------------------------------------------------------------------------
def accuracy_f1(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and macro-F1 over the last axis of `pred` ([..., n]); classes absent from both count 0."""
    acc = (pred == y).float().mean(-1)
    classes = torch.arange(num_classes).view(-1, *([1] * pred.dim()))
    p, t = pred.unsqueeze(0) == classes, (y == classes)
    tp = (p & t).float().sum(-1)
    denominator = p.float().sum(-1) + t.float().sum(-1)
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    return acc, f1.mean(0)


def metrics(pred: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, num_classes: int) -> dict[str, float]:
    acc, f1 = accuracy_f1(torch.as_tensor(pred), torch.as_tensor(y), num_classes)
    return {"accuracy": float(acc), "macro_f1": float(f1)}


def resampled_metric(pred: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, num_classes: int,
                     metric: str) -> torch.Tensor:
    """The metric on each bootstrap resample given as per-row counts [B, n], each resample n rows: a [B]
    vector. Resamples shared by two candidates make their difference a paired bootstrap (selection.py)."""
    n = counts.shape[1]
    if metric == "accuracy":
        return counts @ (pred == y).float() / n
    classes = torch.arange(num_classes)[:, None]
    p, t = (pred[None] == classes).float(), (y[None] == classes).float()
    tp, pp, tt = counts @ (p * t).T, counts @ p.T, counts @ t.T                  # [B, C]
    return torch.where(pp + tt > 0, 2 * tp / (pp + tt).clamp(min=1), torch.zeros_like(tp)).mean(1)


def _bootstrap(pred: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """Std of accuracy and macro-F1 over bootstrap resamples given as per-row counts [B, n]."""
    return tuple(float(resampled_metric(pred, y, counts, num_classes, m).std()) for m in METRICS)


@contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to `count` inside, and restored after: a stage run in-process
    (tests, the study) must not leave the next computation on another thread count, whose
    reductions round differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_thread():
    """Small tensor work on one thread: on a busy 2-core machine, intra-op threads wait on each other."""
    return torch_threads(1)


# -- the solve --------------------------------------------------------------------------------
def solve_and_score(stats: FitStats, X_eval: Sequence[torch.Tensor], folds: Folds,
                    protocol: Protocol) -> dict[str, float]:
    """Ridge for every fold and alpha (see `ridge_weights`: one eigendecomposition in all); score held-out rows.

    The alpha is chosen by the mean held-out metric (the same rows that score the candidate, as in
    any validation-based selection; the test split plays no part). Runs on one thread: these
    matrices are small, and LAPACK's threaded eigensolver is 100x slower on a busy 2-core machine.
    """
    with single_thread():
        return _solve_and_score(stats, X_eval, folds, protocol)


def ridge_weights(G: torch.Tensor, B: torch.Tensor, lam: torch.Tensor, tol: float = 1e-5,
                  max_iter: int = 100) -> torch.Tensor:
    """Ridge solutions W[k, :, a, :] = (G_k + lam[k, a] I)^-1 B_k for every fold k and penalty a: [K, w, A, C].

    One fold: one eigendecomposition serves every alpha. Several folds: their fit Grams differ only
    by which held-out block is left out, so the eigendecomposition of their mean is an excellent
    preconditioner; preconditioned conjugate gradients (all folds, alphas and classes at once, a
    handful of iterations to a relative residual of `tol`) replace K eigendecompositions by one.
    """
    K, w, C = B.shape
    A = lam.shape[1]
    lam4 = lam[:, None, :, None]                                            # [K, 1, A, 1]
    if K == 1:
        e, V = torch.linalg.eigh(G[0])
        VtB = (V.T @ B[0])[None, :, None, :]                                # [1, w, 1, C]
        return (V @ (VtB / (e.clamp(min=0)[None, :, None, None] + lam4)).reshape(w, A * C)).reshape(1, w, A, C)
    e, V = torch.linalg.eigh(G.mean(0))
    scale = 1.0 / (e.clamp(min=0)[:, None, None, None] + lam[None, :, :, None])   # [w, K, A, 1]
    Vt = V.T.contiguous()

    def precondition(R: torch.Tensor) -> torch.Tensor:                      # ~ (G_k + lam)^-1 R
        T = (Vt @ R.transpose(0, 1).reshape(w, K * A * C)).reshape(w, K, A, C) * scale
        return (V @ T.reshape(w, K * A * C)).reshape(w, K, A, C).transpose(0, 1)

    def apply(X: torch.Tensor) -> torch.Tensor:                             # (G_k + lam) X
        return (G @ X.reshape(K, w, A * C)).reshape(K, w, A, C) + lam4 * X

    Bx = B[:, :, None, :].expand(K, w, A, C)
    X = precondition(Bx)
    R = Bx - apply(X)
    Z = precondition(R)
    P = Z
    rz = (R * Z).sum(1, keepdim=True)
    b_norm = Bx.norm(dim=1, keepdim=True).clamp(min=1e-30)
    for _ in range(max_iter):
        if float((R.norm(dim=1, keepdim=True) / b_norm).max()) < tol:
            break
        Q = apply(P)
        step = rz / (P * Q).sum(1, keepdim=True).clamp(min=1e-30)
        X = X + step * P
        R = R - step * Q
        Z = precondition(R)
        rz_new = (R * Z).sum(1, keepdim=True)
        P = Z + rz_new / rz.clamp(min=1e-30) * P
        rz = rz_new
    return X


def _solve_and_score(stats: FitStats, X_eval: Sequence[torch.Tensor], folds: Folds,
                     protocol: Protocol) -> dict[str, float]:
    n = stats.n[:, None]
    mu, ymu = stats.s / n, stats.ysum / n
    G = stats.G - n[:, :, None] * mu[:, :, None] * mu[:, None, :]
    B = stats.XtY - n[:, :, None] * mu[:, :, None] * ymu[:, None, :]
    G = 0.5 * (G + G.transpose(1, 2))
    w = G.shape[1]
    alphas = torch.tensor(protocol.alphas)
    mean_eig = G.diagonal(dim1=1, dim2=2).sum(1).clamp(min=0) / w           # trace / w
    lam = alphas[None, :] * mean_eig[:, None].clamp(min=1e-12)             # [K, A]
    W = ridge_weights(G, B, lam)                                            # [K, w, A, C]
    K, _, A, C = W.shape
    acc, f1, preds = [], [], []
    held = folds.eval_slices() if len(X_eval) == K else folds.eval
    for k, X in enumerate(X_eval):
        scores = ((X - mu[k]) @ W[k].reshape(w, A * C)).reshape(-1, A, C) + ymu[k]   # [n_e, A, C]
        pred = scores.argmax(-1).T                                          # [A, n_e]
        a, f = accuracy_f1(pred, folds.y[held[k]], folds.num_classes)
        acc.append(a), f1.append(f), preds.append(pred)
    acc, f1 = torch.stack(acc), torch.stack(f1)                            # [K, A]
    chosen = (acc if protocol.metric == "accuracy" else f1).mean(0)
    if not bool(torch.isfinite(chosen).all()):
        raise ProbeError(f"the probe's {protocol.metric} is not a number (held-out folds of "
                         f"{[int(x.shape[0]) for x in X_eval]} rows, non-finite features?): nothing is chosen on NaN")
    best = int(torch.argmax(chosen))
    if len(X_eval) > 1:
        acc_std, f1_std = float(acc[:, best].std()), float(f1[:, best].std())
    elif folds.boot is not None:
        acc_std, f1_std = _bootstrap(preds[0][best], folds.y[held[0]], folds.boot, folds.num_classes)
    else:
        acc_std = f1_std = float("nan")
    result = {"accuracy": float(acc[:, best].mean()), "accuracy_std": acc_std,
              "macro_f1": float(f1[:, best].mean()), "macro_f1_std": f1_std, "alpha": float(alphas[best])}
    result["score"] = result[protocol.metric]
    result["std"] = result[f"{protocol.metric}_std"]
    result[PREDICTIONS] = torch.cat(preds, dim=1).to(torch.int16)       # [A, held-out rows], for selection.py
    result[ALPHA_INDEX] = best
    return result


def evaluate_features(X: torch.Tensor, folds: Folds, protocol: Protocol) -> dict[str, float]:
    """Probe score of one feature matrix over the probe rows (no shared blocks)."""
    with single_thread():
        X = X.to(torch.float32)
        return solve_and_score(fit_stats(X, folds), [X[e] for e in folds.eval_slices()], folds, protocol)


def standardise_stats(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std from train rows; constant dimensions get std 1 (they become 0)."""
    mean = train.mean(0, dtype=np.float64)
    std = train.std(0, dtype=np.float64)
    std[std < 1e-6 * max(float(std.max(initial=0.0)), 1e-12)] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)
