"""Length-sorted batches under a padded-token budget: little padding, steady memory."""

from __future__ import annotations

import numpy as np


def token_budget_batches(lengths, token_budget: int) -> list[np.ndarray]:
    """Indices of `lengths` grouped into batches whose padded size (rows x longest) fits the budget.

    Longest texts first, so the first batch shows the peak memory at once; ties keep input order,
    so the same lengths always give the same batches (bit-identical resumes depend on it).
    """
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > token_budget:
        raise ValueError(f"a text of {int(lengths.max())} tokens does not fit token_budget={token_budget}; "
                         f"raise extract.token_budget to at least extract.max_len")
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        rows = max(1, token_budget // max(longest, 1))
        batches.append(order[start:start + rows])
        start += rows
    return batches
