"""Tokens emitted by `verify_drafts` with the learned drafter's distributions q follow the target's.

The target is the toy decoder's structure (feature = embedding of the current token) with a
random LM head, so its next-token distribution depends on the previous token and a whole drafted
chain is verified against a chain of target distributions. The drafter is a real (untrained,
so q differs from p) `Drafter`, drafting with each row's temperature / top-p / top-k.
"""

import pytest
import torch

from slipstream.drafter import DraftContext, Drafter, DrafterConfig, TargetHead
from slipstream.models.decoder import Decoder, DecoderConfig
from slipstream.rollout.sampler import shape_logits
from slipstream.rollout.spec.verify import verify_drafts

from tests.chi_square import chi_square_p

V, H, K, LENGTH = 6, 16, 3, 3
PROMPT = (2, 4)  # generation continues after token 4
CONFIGS = [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 3)]
ROWS = 12_000


def _target() -> Decoder:
    c = DecoderConfig(model_type="llama", vocab_size=V, hidden_size=H, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=H // 2, intermediate_size=H)
    decoder = Decoder(c)
    g = torch.Generator().manual_seed(11)
    basis, _ = torch.linalg.qr(torch.randn(H, H, generator=g))
    with torch.no_grad():
        decoder.embed.weight.copy_(basis[:V] * H**0.5)
        decoder.norm.weight.fill_(1.0)
        decoder.lm_head.weight.copy_(torch.randn(V, H, generator=g) * 0.4)
    return decoder


def _table(head: TargetHead, embed: torch.Tensor, t: float, p: float, k: int) -> torch.Tensor:
    """[V, V]: the target's sampling distribution of the next token given the current one."""
    return shape_logits(head.logits(embed), torch.full((V,), t), torch.full((V,), p),
                        torch.full((V,), k)).softmax(-1).double()


def _sequence_probs(table: torch.Tensor) -> torch.Tensor:
    """Probability of every LENGTH-token continuation after PROMPT[-1], indexed like the codes."""
    probs = table[PROMPT[-1]]
    for _ in range(LENGTH - 1):
        probs = (probs[:, None] * table[torch.arange(probs.shape[0]) % V]).reshape(-1)
    return probs


def _context(tokens: torch.Tensor, count: torch.Tensor, embed: torch.Tensor) -> DraftContext:
    """Every row's pairs (h_t, x_{t+1}) so far, right-aligned: h_t = embed(x_t) in this target."""
    N, width = tokens.shape
    n = count + len(PROMPT) - 1  # pairs: t = 0 .. n-1
    cols = torch.arange(width - 1)[None, :]
    start = (width - 1) - n
    t = (cols - start[:, None]).clamp(min=0)
    valid = cols >= start[:, None]
    x_t = tokens.gather(1, t)
    x_next = tokens.gather(1, (t + 1).clamp(max=width - 1))
    return DraftContext(features=embed[x_t] * valid[..., None], next_tokens=torch.where(valid, x_next, 0),
                        positions=t, lengths=n)


def _generate(drafter: Drafter, head: TargetHead, embed: torch.Tensor, temp, top_p, top_k, gen):
    """LENGTH tokens per row by rounds of draft (random lengths 0..K) + verify."""
    N = temp.shape[0]
    P = len(PROMPT)
    tokens = torch.zeros(N, P + LENGTH + K + 1, dtype=torch.long)
    tokens[:, :P] = torch.tensor(PROMPT)
    count = torch.zeros(N, dtype=torch.long)
    accepted_all, lens_all = [], []
    while bool((count < LENGTH).any()):
        rows = (count < LENGTH).nonzero().squeeze(-1)
        B = rows.shape[0]
        ctx = _context(tokens[rows, :P + LENGTH], count[rows], embed)
        draft = drafter.draft(ctx, K, temp[rows], top_p[rows], top_k[rows], generator=gen)
        draft_lens = torch.randint(0, K + 1, (B,), generator=gen)
        last = tokens[rows, P - 1 + count[rows]]
        target_logits = head.logits(embed[torch.cat([last[:, None], draft.tokens], 1)])
        res = verify_drafts(target_logits, draft.tokens, draft_lens, temp[rows], top_p[rows], top_k[rows],
                            draft_probs=draft.probs, generator=gen)
        accepted_all.append(res.accepted_lens)
        lens_all.append(draft_lens)
        cols = P + count[rows, None] + torch.arange(K + 1)[None, :]
        emit = torch.arange(K + 1)[None, :] < res.num_emitted[:, None]
        r = rows[:, None].expand_as(cols)
        tokens[r[emit], cols[emit]] = res.output_tokens[emit]
        count[rows] += res.num_emitted
    return tokens[:, P:P + LENGTH], torch.cat(accepted_all), torch.cat(lens_all)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    target = _target()
    head = TargetHead.from_decoder(target)
    drafter = Drafter(target.config, head, DrafterConfig(window=8))
    return drafter, head, target.embed.weight


def test_drafter_distributions_verify_to_the_target_distribution(setup):
    drafter, head, embed = setup
    gen = torch.Generator().manual_seed(5)
    temp = torch.tensor([c[0] for c in CONFIGS]).repeat_interleave(ROWS)
    top_p = torch.tensor([c[1] for c in CONFIGS]).repeat_interleave(ROWS)
    top_k = torch.tensor([c[2] for c in CONFIGS]).repeat_interleave(ROWS)
    tokens, accepted, draft_lens = _generate(drafter, head, embed, temp, top_p, top_k, gen)

    # Chains were really verified: some accept several drafts, some reject the first one.
    assert bool((accepted >= 2).any()) and bool(((accepted == 0) & (draft_lens > 0)).any())
    codes = (tokens * torch.tensor([V * V, V, 1])).sum(-1)
    for i, (t, p, k) in enumerate(CONFIGS):
        counts = torch.bincount(codes[i * ROWS:(i + 1) * ROWS], minlength=V ** LENGTH)
        table = _table(head, embed, t, p, k)
        assert chi_square_p(counts, _sequence_probs(table)) > 1e-3, (t, p, k)
        # Power: a 5% leak of the uniform distribution into every step is rejected.
        leaky = 0.95 * table + 0.05 / V
        assert chi_square_p(counts, _sequence_probs(leaky)) < 1e-6, (t, p, k)


def test_greedy_rows_emit_the_targets_greedy_chain(setup):
    drafter, head, embed = setup
    N = 64
    zeros = torch.zeros(N)
    tokens, _, _ = _generate(drafter, head, embed, zeros, torch.ones(N), torch.zeros(N, dtype=torch.long),
                             torch.Generator().manual_seed(0))
    argmax = head.logits(embed).argmax(-1)
    expected = [PROMPT[-1]]
    for _ in range(LENGTH):
        expected.append(int(argmax[expected[-1]]))
    assert (tokens == torch.tensor(expected[1:])).all()
