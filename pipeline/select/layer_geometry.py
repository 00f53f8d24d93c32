"""Label-free layer scores of pooled vectors (issue 14, part 3): dataset entropy, effective rank, anisotropy.

The formulas are those of /work/shared/docs/REFERENCES.md ("Label-free layer scores", after Skean et al.
2025, "Layer by Layer"). They need no labels, so they are computed on a seeded sample of train rows,
uncentred and unstandardised (the vectors as the model gives them), one layer at a time.

Left out: prompt entropy (the matrix entropy of one text's token matrix) and curvature (the angle between
successive token-to-token steps) both need per-token hidden states; the store keeps one pooled vector per
text and layer, so neither can be computed from it.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import entropy

from pipeline.select.probe import single_thread

# +1: a higher value is read as a better layer, -1: a lower one (see docs/configuration.md, label-free layer scores)
ORIENTATION = {"dataset_entropy": 1, "effective_rank": 1, "anisotropy": -1}
ATTENTION_ORIENTATION = {"attention_entropy": 1}   # read as: attention spread over more of the text, a better layer
LEFT_OUT = {"prompt_entropy": "needs each text's token states; the store keeps pooled vectors only",
            "curvature": "needs token sequences (successive token steps); the store keeps pooled vectors only"}


def gram_spectrum(Z: np.ndarray | torch.Tensor) -> np.ndarray:
    """Eigenvalues (float64, >= 0) of K = Z Zᵀ, through the smaller of Z Zᵀ and Zᵀ Z (same non-zero spectrum)."""
    Z = torch.as_tensor(np.asarray(Z), dtype=torch.float64)
    K = Z @ Z.T if Z.shape[0] <= Z.shape[1] else Z.T @ Z
    with single_thread():
        values = torch.linalg.eigvalsh(K).numpy()
    return np.clip(values, 0.0, None)


def spectrum_entropy(eigenvalues: np.ndarray, alpha: float = 1.0) -> float:
    """Matrix (Renyi) entropy of a Gram spectrum normalised to trace 1 (REFERENCES.md, Skean et al. 2025):
    S_α = log(Σ λᵢ^α) / (1 − α), and the Shannon limit −Σ λ log λ at α = 1."""
    lam = eigenvalues / eigenvalues.sum()
    if alpha == 1.0:
        return float(entropy(lam))
    return float(np.log(np.sum(lam[lam > 0] ** alpha)) / (1.0 - alpha))


def spectrum_effective_rank(eigenvalues: np.ndarray) -> float:
    """RankMe (REFERENCES.md; Garrido et al. 2023): exp(−Σ pᵢ log pᵢ), pᵢ the singular values normalised to
    sum 1; the singular values of Z are the square roots of the Gram eigenvalues."""
    return float(np.exp(entropy(np.sqrt(eigenvalues))))


def effective_rank(Z: np.ndarray) -> float:
    """Effective rank (RankMe) of Z [N, D] (REFERENCES.md)."""
    return spectrum_effective_rank(gram_spectrum(Z))


def anisotropy(Z: np.ndarray, pairs: int = 10_000, seed: int = 0) -> float:
    """Mean cosine similarity of seeded random pairs of distinct rows (REFERENCES.md; Ethayarajh 2019)."""
    rng = np.random.default_rng(seed)
    n = len(Z)
    i = rng.integers(n, size=pairs)
    j = (i + rng.integers(1, n, size=pairs)) % n                 # never the row itself
    unit = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(unit[i] * unit[j], axis=1)))


def sample_rows(n: int, rows: int, seed: int) -> np.ndarray:
    """The seeded, sorted train rows the label-free scores read."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, rows), replace=False))


def layer_geometry(samples: list[np.ndarray], seed: int = 0) -> dict[str, list[float]]:
    """The three scores of every layer, from that layer's sampled pooled vectors [n, D] (one Gram spectrum each)."""
    out: dict[str, list[float]] = {name: [] for name in ORIENTATION}
    for Z in samples:
        spectrum = gram_spectrum(Z)
        out["dataset_entropy"].append(round(spectrum_entropy(spectrum), 6))
        out["effective_rank"].append(round(spectrum_effective_rank(spectrum), 6))
        out["anisotropy"].append(round(anisotropy(Z, seed=seed), 6))
    return out


def mean_attention_entropy(store) -> tuple[list[float], int] | None:
    """Per layer, the mean attention entropy of the store's sampled train rows (stored at extraction, issue 14
    part 1; layer 0, the embedding output, has no attention: NaN), and how many rows it averages; None for a
    store without attention entropy."""
    if not store.has_attention_entropy:
        return None
    values = store.attention_entropy("train")[store.attention_sampled("train")]
    if not len(values):
        return None
    means = np.full(values.shape[1], np.nan)
    means[1:] = values[:, 1:].astype(np.float64).mean(axis=0)
    return [round(float(v), 6) for v in means], len(values)
