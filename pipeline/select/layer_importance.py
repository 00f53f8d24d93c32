"""Gradient layer importance (issue 14, part 2): one linear head over all layers, then per layer how much
the held-out loss moves with that layer's input.

The head reads every layer's block of the score stage's bank (`pipeline.select.scoring.load_bank`: each layer
standardised, projected on the basis shared by all layers), concatenated and standardised per column
with the fit rows' statistics, so the blocks share one scale and their gradients compare. It is fitted
on the fit rows of the first fold (protocol validation: train) and judged on that fold's held-out rows
(validation; under cv, the first fold of train): no test row is in the bank.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize

from pipeline.select.probe import Folds, single_thread

WEIGHT_DECAY = 1e-2     # L2 on the head's weights: the concatenation is wide for its rows (study: 1000 rows)
MAX_ITER = 100          # L-BFGS iterations at most (the study's heads stop on their own after about 55)


def _rows(rows: torch.Tensor | slice, n: int) -> torch.Tensor:
    return torch.arange(n)[rows] if isinstance(rows, slice) else rows


def fit_linear_head(X: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L2 penalty, by scipy's L-BFGS-B from zero (convex: a unique
    optimum). Not torch.optim: its first use imports torch._dynamo, seconds the score stage would pay."""
    shape = (X.shape[1] + 1, num_classes)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        params = torch.from_numpy(theta.astype(np.float32)).reshape(shape).requires_grad_(True)
        loss = (torch.nn.functional.cross_entropy(X @ params[:-1] + params[-1], y)
                + 0.5 * WEIGHT_DECAY * params[:-1].pow(2).sum())
        loss.backward()
        return float(loss.detach()), params.grad.numpy().astype(np.float64).ravel()
    theta = minimize(objective, np.zeros(shape).ravel(), jac=True, method="L-BFGS-B",
                     options={"maxiter": MAX_ITER}).x
    params = torch.from_numpy(theta.astype(np.float32)).reshape(shape)
    return params[:-1], params[-1]


def input_gradients(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d loss_i / d x_i for every held-out row (summed loss: each row's gradient is its own loss's)."""
    X = X.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(X @ W + b, y, reduction="sum").backward()
    return X.grad


def layer_importance(F: torch.Tensor, folds: Folds, rows: int = 8192, seed: int = 0) -> dict[str, list[float]]:
    """Per layer of F [N, L, r]: `gradient`, the mean |d loss / d input| over its block and the held-out rows,
    and `input_x_gradient`, its share of Σ |x · d loss / d x| (gradient times input, Shrikumar et al. 2017).

    The head fits on at most `rows` seeded fit rows (a cap on the cost for large corpora)."""
    n, num_layers, r = F.shape
    fit, held = _rows(folds.fit[0], n), _rows(folds.eval[0], n)
    if len(fit) > rows:
        pick = np.sort(np.random.default_rng(seed).choice(len(fit), size=rows, replace=False))
        fit = fit[torch.as_tensor(pick)]
    with single_thread():
        X_fit = F[fit].reshape(len(fit), -1)
        mean, std = X_fit.mean(0), X_fit.std(0).clamp_min(1e-6)
        W, b = fit_linear_head((X_fit - mean) / std, folds.y[fit], folds.num_classes)
        X_held = (F[held].reshape(len(held), -1) - mean) / std
        grad = input_gradients(W, b, X_held, folds.y[held]).reshape(len(held), num_layers, r)
        attribution = (grad * X_held.reshape(len(held), num_layers, r)).abs().sum((0, 2))
    return {"gradient": [round(float(v), 8) for v in grad.abs().mean((0, 2))],
            "input_x_gradient": [round(float(v), 6) for v in attribution / attribution.sum()]}
