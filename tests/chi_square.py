"""Pearson's chi-square goodness-of-fit test, shared by the distribution tests."""

import torch


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor, groups: int = 1, min_expected: float = 5.0) -> float:
    """p-value of the observed `counts` per cell against the cells' probabilities `probs`.

    `groups`: the cells form that many groups sampled equally often (e.g. the prompts whose
    continuations are counted), each group's probabilities summing to 1. Cells expected fewer than
    `min_expected` times are pooled into one; a count in a cell of probability 0 gives p = 0.
    """
    counts, probs = counts.double(), probs.double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum() / groups
    big = expected >= min_expected
    small = ~big & (probs > 0)
    observed = torch.cat([counts[big], counts[small].sum()[None]])
    expected = torch.cat([expected[big], expected[small].sum()[None]])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(expected) - groups), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))  # the chi-square survival function
