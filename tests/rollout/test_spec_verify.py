"""Speculative verification is lossless: emitted sequences follow the target's plain-sampling distribution.

The "model" is a table of logits indexed by the previous token ([V, V]), so the target distribution at
each draft position depends on the draft before it and verification of a whole chain is exercised.
"""

import pytest
import torch

from slipstream.rollout.sampler import sample, shape_logits
from slipstream.rollout.spec import VerifyResult, verify_drafts

from tests.chi_square import chi_square_p

V, K, LENGTH, START = 6, 3, 3, 0
# (temperature, top_p, top_k): plain, truncated by top-p, truncated by top-k.
CONFIGS = [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 3)]
ROWS_PER_CONFIG = 20_000


def _tables():
    gen = torch.Generator().manual_seed(1234)
    target = torch.randn(V, V, generator=gen) * 1.5  # target logits given the previous token
    drafter = torch.randn(V, V, generator=gen)  # drafter logits given the previous token
    fixed = torch.randint(0, V, (V,), generator=gen)  # a poor deterministic draft: next = fixed[previous]
    return target, drafter, fixed


def _probs_table(logits: torch.Tensor, t: float, p: float, k: int) -> torch.Tensor:
    """[V, V] sampling distribution of the next token given the previous one."""
    n = logits.shape[0]
    shaped = shape_logits(logits, torch.full((n,), t), torch.full((n,), p), torch.full((n,), k))
    return shaped.softmax(-1)


def _sequence_probs(table: torch.Tensor) -> torch.Tensor:
    """Exact probability of each LENGTH-token continuation of START under plain sampling, flattened."""
    probs = table[START]
    for _ in range(LENGTH - 1):  # index = prefix index * V + next token; the prefix's last token is index % V
        probs = (probs[:, None] * table[torch.arange(probs.shape[0]) % V]).reshape(-1)
    return probs.double()


def _speculative_generate(target, temp, top_p, top_k, gen, drafter=None, fixed=None):
    """LENGTH tokens per row from START by rounds of draft + verify; drafts have random lengths 0..K.

    Returns (tokens [N, LENGTH], logprobs [N, LENGTH], list of accepted_lens, list of draft_lens).
    """
    N = temp.shape[0]
    width = LENGTH + K + 1
    tokens = torch.full((N, width), -1, dtype=torch.long)
    logprobs = torch.zeros(N, width)
    count = torch.zeros(N, dtype=torch.long)
    accepted_log, lens_log = [], []
    while bool((count < LENGTH).any()):
        rows = (count < LENGTH).nonzero().squeeze(-1)
        B = rows.shape[0]
        prev = torch.where(count[rows] > 0, tokens[rows, (count[rows] - 1).clamp(min=0)], START)
        draft_lens = torch.randint(0, K + 1, (B,), generator=gen)
        chain = [prev]  # chain[j]: the token before draft position j
        drafts, qs = [], []
        for _ in range(K):
            if drafter is None:
                x = fixed[chain[-1]]
            else:
                q = drafter[chain[-1]].softmax(-1)
                x = torch.multinomial(q, 1, generator=gen).squeeze(-1)
                qs.append(q)
            drafts.append(x)
            chain.append(x)
        draft_tokens = torch.stack(drafts, 1)
        # Padding beyond draft_lens must be ignored: scramble it.
        pad = torch.arange(K)[None, :] >= draft_lens[:, None]
        draft_tokens = torch.where(pad, -7, draft_tokens)
        target_logits = target[torch.stack(chain, 1)]  # [B, K+1, V]
        draft_probs = None if drafter is None else torch.stack(qs, 1)
        res = verify_drafts(target_logits, draft_tokens, draft_lens, temp[rows], top_p[rows], top_k[rows],
                            draft_probs=draft_probs, generator=gen)
        assert isinstance(res, VerifyResult)
        assert bool((res.accepted_lens <= draft_lens).all())
        accepted_log.append(res.accepted_lens)
        lens_log.append(draft_lens)
        cols = count[rows, None] + torch.arange(K + 1)[None, :]
        emit = torch.arange(K + 1)[None, :] < res.num_emitted[:, None]
        r = rows[:, None].expand_as(cols)
        tokens[r[emit], cols[emit]] = res.output_tokens[emit]
        logprobs[r[emit], cols[emit]] = res.output_logprobs[emit]
        count[rows] += res.num_emitted
    return tokens[:, :LENGTH], logprobs[:, :LENGTH], torch.cat(accepted_log), torch.cat(lens_log)


def _params():
    temp = torch.tensor([c[0] for c in CONFIGS]).repeat_interleave(ROWS_PER_CONFIG)
    top_p = torch.tensor([c[1] for c in CONFIGS]).repeat_interleave(ROWS_PER_CONFIG)
    top_k = torch.tensor([c[2] for c in CONFIGS]).repeat_interleave(ROWS_PER_CONFIG)
    return temp, top_p, top_k


@pytest.mark.parametrize("with_drafter", [False, True], ids=["deterministic-drafts", "drafter-distribution"])
def test_emitted_sequences_follow_plain_sampling_from_the_target(with_drafter):
    target, drafter, fixed = _tables()
    gen = torch.Generator().manual_seed(7 + with_drafter)
    temp, top_p, top_k = _params()  # all configurations share one batch: per-row parameters
    tokens, logprobs, accepted, draft_lens = _speculative_generate(
        target, temp, top_p, top_k, gen, drafter=drafter if with_drafter else None, fixed=fixed)

    # Chains were really verified: some rounds accept several drafts, some reject the first one.
    assert bool((accepted >= 2).any()) and bool(((accepted == 0) & (draft_lens > 0)).any())
    assert bool((accepted < draft_lens).any())

    drafter_seq = _sequence_probs(drafter.softmax(-1))
    codes = (tokens * torch.tensor([V * V, V, 1])).sum(-1)
    for i, (t, p, k) in enumerate(CONFIGS):
        sl = slice(i * ROWS_PER_CONFIG, (i + 1) * ROWS_PER_CONFIG)
        table = _probs_table(target, t, p, k)
        counts = torch.bincount(codes[sl], minlength=V ** LENGTH)
        assert chi_square_p(counts, _sequence_probs(table)) > 1e-3, (t, p, k)
        # Power: the same test rejects the drafter's distribution and the target under other parameters.
        assert chi_square_p(counts, drafter_seq) < 1e-6
        t2, p2, k2 = CONFIGS[(i + 1) % len(CONFIGS)]
        assert chi_square_p(counts, _sequence_probs(_probs_table(target, t2, p2, k2))) < 1e-6
        # ... and a subtle error: 5% of the drafter's distribution leaking into every step.
        assert chi_square_p(counts, _sequence_probs(0.95 * table + 0.05 * drafter.softmax(-1))) < 1e-6
        # Every emitted token carries its log-prob under the target's sampling distribution.
        prev = torch.cat([torch.full((ROWS_PER_CONFIG, 1), START), tokens[sl, :-1]], 1)
        assert torch.allclose(logprobs[sl], table[prev, tokens[sl]].log(), atol=1e-5)


def test_greedy_matches_argmax_decoding_token_for_token():
    gen = torch.Generator().manual_seed(3)
    vocab, n_rows, length = 40, 64, 16
    table = torch.randn(vocab, vocab, generator=gen) * 2
    argmax_next = table.argmax(-1)
    zeros = torch.zeros(n_rows)
    # Greedy rows may still carry top-p / top-k settings; they must not change the argmax.
    top_p = torch.where(torch.arange(n_rows) % 2 == 0, 0.5, 1.0)
    top_k = torch.where(torch.arange(n_rows) % 3 == 0, 4, 0)
    starts = torch.randint(0, vocab, (n_rows,), generator=gen)

    # Plain decoding with the sampler.
    ref_tokens, ref_logprobs, prev = [], [], starts
    for _ in range(length):
        tok, lp = sample(table[prev], zeros, top_p, top_k, generator=gen)
        ref_tokens.append(tok)
        ref_logprobs.append(lp)
        prev = tok
    ref_tokens, ref_logprobs = torch.stack(ref_tokens, 1), torch.stack(ref_logprobs, 1)

    # Speculative decoding: drafts follow the argmax chain but go wrong at random.
    out_tokens = [[] for _ in range(n_rows)]
    out_logprobs = [[] for _ in range(n_rows)]
    prev = starts
    while min(len(o) for o in out_tokens) < length:
        chain, drafts = [prev], []
        for _ in range(K):
            wrong = torch.rand(n_rows, generator=gen) < 0.3
            x = torch.where(wrong, torch.randint(0, vocab, (n_rows,), generator=gen), argmax_next[chain[-1]])
            drafts.append(x)
            chain.append(x)
        draft_lens = torch.randint(0, K + 1, (n_rows,), generator=gen)
        res = verify_drafts(table[torch.stack(chain, 1)], torch.stack(drafts, 1), draft_lens, zeros, top_p, top_k,
                            generator=gen)
        for r in range(n_rows):
            m = int(res.num_emitted[r])
            out_tokens[r] += res.output_tokens[r, :m].tolist()
            out_logprobs[r] += res.output_logprobs[r, :m].tolist()
        prev = res.output_tokens[torch.arange(n_rows), res.accepted_lens]
    assert torch.equal(torch.tensor([o[:length] for o in out_tokens]), ref_tokens)
    assert torch.allclose(torch.tensor([o[:length] for o in out_logprobs]), ref_logprobs, atol=1e-5)


@pytest.mark.parametrize("with_drafter", [False, True])
def test_logprobs_are_those_of_the_target_sampling_distribution(with_drafter):
    gen = torch.Generator().manual_seed(11)
    B, vocab = 48, 32
    target_logits = torch.randn(B, K + 1, vocab, generator=gen) * 2
    kinds = torch.arange(B) % 4  # greedy, plain, top-p, top-k
    temp = torch.tensor([0.0, 1.0, 0.7, 1.2])[kinds]
    top_p = torch.tensor([1.0, 1.0, 0.9, 1.0])[kinds]
    top_k = torch.tensor([0, 0, 0, 5])[kinds]
    shaped = shape_logits(target_logits.reshape(-1, vocab), temp.repeat_interleave(K + 1),
                          top_p.repeat_interleave(K + 1), top_k.repeat_interleave(K + 1)).view(B, K + 1, vocab)
    expected_logp = shaped.log_softmax(-1)
    # Drafts: mostly the target's argmax (so several get accepted), sometimes random.
    drafts = torch.where(torch.rand(B, K, generator=gen) < 0.8, shaped[:, :K].argmax(-1),
                         torch.randint(0, vocab, (B, K), generator=gen))
    draft_probs = None
    if with_drafter:
        draft_probs = (target_logits[:, :K] + torch.randn(B, K, vocab, generator=gen)).softmax(-1)
    draft_lens = torch.randint(0, K + 1, (B,), generator=gen)
    res = verify_drafts(target_logits, drafts, draft_lens, temp, top_p, top_k, draft_probs=draft_probs,
                        generator=gen, pad_token_id=-1)

    pos = torch.arange(K + 1)[None, :]
    emitted = pos < res.num_emitted[:, None]
    assert bool((res.accepted_lens <= draft_lens).all()) and bool((res.accepted_lens > 0).any())
    # Accepted tokens are the drafts; the rest is padding.
    accepted = pos[:, :K] < res.accepted_lens[:, None]
    assert torch.equal(res.output_tokens[:, :K][accepted], drafts[accepted])
    assert bool((res.output_tokens[~emitted] == -1).all()) and bool((res.output_logprobs[~emitted] == 0).all())
    tok = res.output_tokens.clamp(min=0)
    ref = expected_logp.gather(-1, tok[..., None]).squeeze(-1)
    assert torch.allclose(res.output_logprobs[emitted], ref[emitted], atol=1e-5)
    assert bool(torch.isfinite(res.output_logprobs).all())
    assert res.output_logprobs.dtype == torch.float32


def test_no_drafts_emit_one_token_from_the_target_and_ignore_padding():
    gen = torch.Generator().manual_seed(5)
    N, vocab = 30_000, 8
    logits = torch.randn(vocab, generator=gen) * 1.5
    target_logits = torch.full((N, K + 1, vocab), float("nan"))  # rows past draft_lens are never read
    target_logits[:, 0] = logits
    temp, top_p, top_k = torch.full((N,), 0.8), torch.full((N,), 0.95), torch.zeros(N, dtype=torch.long)
    draft_tokens = torch.randint(-5, 2 * vocab, (N, K), generator=gen)  # garbage, out of range too
    draft_probs = torch.full((N, K, vocab), float("nan"))
    for probs in (None, draft_probs):
        res = verify_drafts(target_logits, draft_tokens, torch.zeros(N, dtype=torch.long), temp, top_p, top_k,
                            draft_probs=probs, generator=gen)
        assert bool((res.accepted_lens == 0).all())
        p = shape_logits(logits[None], temp[:1], top_p[:1], top_k[:1]).softmax(-1)[0]
        counts = torch.bincount(res.output_tokens[:, 0], minlength=vocab)
        assert chi_square_p(counts, p) > 1e-3
        assert chi_square_p(counts, logits.softmax(-1)) < 1e-6
        assert torch.allclose(res.output_logprobs[:, 0], p[res.output_tokens[:, 0]].log(), atol=1e-5)
        assert bool((res.output_logprobs[:, 1:] == 0).all())


def test_ragged_batch_reads_only_each_rows_own_positions():
    gen = torch.Generator().manual_seed(9)
    B, vocab = 4, 16
    draft_lens = torch.tensor([0, 1, 2, 3])
    base = torch.randn(B, K + 1, vocab, generator=gen)
    # Greedy, drafts equal to the argmax: every row accepts all its drafts and then takes the bonus argmax.
    drafts = base[:, :K].argmax(-1)
    zeros = torch.zeros(B)
    poisoned = base.clone()
    for b in range(B):
        poisoned[b, draft_lens[b] + 1:] = float("nan")
        drafts[b, draft_lens[b]:] = 99
    res = verify_drafts(poisoned, drafts, draft_lens, zeros, torch.ones(B), torch.zeros(B, dtype=torch.long))
    assert torch.equal(res.accepted_lens, draft_lens)
    for b in range(B):
        n = int(draft_lens[b])
        assert torch.equal(res.output_tokens[b, :n], drafts[b, :n])
        assert int(res.output_tokens[b, n]) == int(base[b, n].argmax())
        assert bool(torch.isfinite(res.output_logprobs[b, :n + 1]).all())


def test_full_acceptance_when_draft_is_the_greedy_argmax():
    target, _, _ = _tables()
    gen = torch.Generator().manual_seed(13)
    N = 500
    prev = torch.randint(0, V, (N,), generator=gen)
    chain = [prev]
    for _ in range(K):
        chain.append(target[chain[-1]].argmax(-1))
    draft_lens = torch.randint(0, K + 1, (N,), generator=gen)
    zeros = torch.zeros(N)
    res = verify_drafts(target[torch.stack(chain, 1)], torch.stack(chain[1:], 1), draft_lens, zeros,
                        torch.ones(N), torch.zeros(N, dtype=torch.long), generator=gen)
    assert torch.equal(res.accepted_lens, draft_lens)
    greedy_next = target[chain[-1]].argmax(-1)  # the argmax after the longest draft
    expected = torch.stack(chain[1:] + [greedy_next], 1)[torch.arange(N), draft_lens]
    assert torch.equal(res.output_tokens[torch.arange(N), draft_lens], expected)


@pytest.mark.parametrize("t, p, k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 3)])
def test_full_acceptance_when_the_drafter_is_the_target(t, p, k):
    target, _, _ = _tables()
    gen = torch.Generator().manual_seed(17)
    N = 4000
    table = _probs_table(target, t, p, k)
    chain, qs = [torch.randint(0, V, (N,), generator=gen)], []
    for _ in range(K):
        q = table[chain[-1]]
        qs.append(q)
        chain.append(torch.multinomial(q, 1, generator=gen).squeeze(-1))
    draft_lens = torch.randint(0, K + 1, (N,), generator=gen)
    res = verify_drafts(target[torch.stack(chain, 1)], torch.stack(chain[1:], 1), draft_lens, torch.full((N,), t),
                        torch.full((N,), p), torch.full((N,), k), draft_probs=torch.stack(qs, 1), generator=gen)
    assert torch.equal(res.accepted_lens, draft_lens)
