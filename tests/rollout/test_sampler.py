import math

import pytest
import torch

from slipstream.rollout.sampler import inverse_cdf, sample, shape_logits

from tests.chi_square import chi_square_p


def _target(logits, t, p, k):
    """Independent, unbatched reading of the rules: scale, keep top-k, keep smallest top-p prefix."""
    z = logits / t
    order = torch.argsort(z, descending=True)
    keep = torch.zeros_like(z, dtype=torch.bool)
    mass, probs_k = 0.0, None
    allowed = order[:k] if k > 0 else order
    probs_k = torch.softmax(z[allowed], -1)
    for idx, pr in zip(allowed.tolist(), probs_k.tolist()):
        keep[idx] = True
        mass += pr
        if mass >= p:
            break
    out = torch.where(keep, z, torch.tensor(float("-inf"))).softmax(-1)
    return out


@pytest.mark.parametrize("t, p, k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.8, 0), (1.3, 1.0, 3), (0.8, 0.9, 4)])
def test_empirical_frequencies_match_the_target_distribution(t, p, k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=gen) * 1.5
    target = _target(logits, t, p, k)
    N = 40_000
    rows = logits.expand(N, -1)
    tokens, logprobs = sample(rows, torch.full((N,), t), torch.full((N,), p), torch.full((N,), k), generator=gen)
    counts = torch.bincount(tokens, minlength=8)
    assert counts[target == 0].sum() == 0  # truncated tokens are never drawn
    assert chi_square_p(counts, target) > 1e-3
    if (t, p, k) != (1.0, 1.0, 0):  # the test has the power to tell the plain softmax apart
        assert chi_square_p(counts, logits.softmax(-1)) < 1e-6
    assert torch.allclose(logprobs, target[tokens].log(), atol=1e-5)  # logprob of the sampling distribution


def test_rows_keep_their_own_parameters_and_greedy_rows_take_the_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=gen)
    temp = torch.tensor([0.0, 1.0, 0.5, 0.0])
    top_p = torch.tensor([1.0, 0.5, 1.0, 0.3])
    top_k = torch.tensor([0, 0, 2, 1])
    shaped = shape_logits(logits, temp, top_p, top_k)
    for r in range(4):
        ref = _target(logits[r], temp[r].item() or 1.0, top_p[r].item(), int(top_k[r]))
        assert torch.allclose(shaped[r].softmax(-1), ref, atol=1e-6)
    tokens, lp = sample(logits, temp, top_p, top_k, generator=gen)
    assert tokens[0] == logits[0].argmax() and tokens[3] == logits[3].argmax()
    assert math.isclose(lp[0].item(), logits[0].log_softmax(-1).max().item(), abs_tol=1e-6)


def test_a_tail_token_far_below_the_running_sum_keeps_its_interval():
    # Weights [1, 1e-9, 1]: token 1 owns the running sums (1, 1 + 1e-9], which a float32 sum would
    # round away (1 + 1e-9 == 1 in float32), drawing token 2 there instead.
    weights = torch.tensor([[1.0, 1e-9, 1.0]] * 3)
    total = 2.0 + 1e-9
    reach = torch.tensor([[1.0 + 0.5e-9], [1.0 + 1e-9], [1.0]], dtype=torch.float64)  # sums to reach
    assert inverse_cdf(weights, 1.0 - reach / total).tolist() == [1, 1, 0]
    # the ends of [0, 1): u = 0 reaches the whole sum, the largest u the first token with a weight
    ends = torch.tensor([[0.0], [1.0 - 2.0 ** -53]], dtype=torch.float64)
    assert inverse_cdf(torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]] * 2), ends).tolist() == [3, 1]
