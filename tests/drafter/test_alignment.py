"""A drafter trained on the toy target's own rollouts learns it exactly; an off-by-one pairing cannot.

The features come from the real engine's capture hook into the FeatureBuffer, so the test covers
the whole data path: StepFeatures -> ring -> aligned pairs -> packed batches -> drafter.
"""

import torch

import slipstream.drafter.feature_buffer as feature_buffer
from slipstream.drafter import BubbleTrainer, DraftContext, Drafter, DrafterConfig, FeatureBuffer, TargetHead
from slipstream.drafter.bubble_trainer import drafter_loss
from slipstream.rollout.spec.verify import verify_drafts

CONFIG = dict(window=16, batch_tokens=256, seq_len=64, lr=1e-2, buffer_tokens=16384, token_loss_weight=1.0)
STEPS = 120
DRAFT = 4


def _train(toy):
    torch.manual_seed(0)
    decoder = toy.decoder()
    cfg = DrafterConfig(**CONFIG)
    buffer = FeatureBuffer(cfg, toy.hidden)
    toy.engine(decoder, buffer).generate(toy.requests(num_prompts=8, samples=4, max_tokens=40, seed=0))
    drafter = Drafter(decoder.config, TargetHead.from_decoder(decoder), cfg)
    trainer = BubbleTrainer(drafter, buffer)
    report = trainer.train_until(max_steps=STEPS)
    assert report.steps == STEPS
    with torch.no_grad():
        loss, _ = drafter_loss(drafter, buffer.sample(torch.Generator().manual_seed(1)))
    return decoder, drafter, float(loss)


def _acceptance(toy, decoder, drafter) -> float:
    """Fraction of drafted tokens accepted by lossless verification at temperature 1, drafting
    DRAFT tokens after random cut points of fresh target rollouts."""
    head = TargetHead.from_decoder(decoder)
    completions = toy.engine(decoder, None).generate(toy.requests(num_prompts=16, samples=4, max_tokens=30, seed=7))
    g = torch.Generator().manual_seed(3)
    seqs = []
    for c in completions:
        ids = torch.tensor(c.prompt_ids + c.tokens)
        for n in torch.randint(4, ids.shape[0], (4,), generator=g).tolist():
            # the toy's feature at t is embed(x_t): h_0..h_{n-1} with tokens x_0..x_n
            seqs.append((decoder.embed.weight[ids[:n]], ids[:n + 1], 0))
    ctx = DraftContext.from_sequences(seqs, drafter.config.window)
    B = len(seqs)
    temperature = torch.ones(B)
    draft = drafter.draft(ctx, DRAFT, temperature, generator=g)
    chain = torch.cat([ctx.next_tokens[:, -1:], draft.tokens], dim=1)  # x_n, d_1..d_k
    with torch.no_grad():
        target_logits = head.logits(decoder.embed.weight[chain])  # [B, k+1, V]
    result = verify_drafts(target_logits, draft.tokens, torch.full((B,), DRAFT), temperature, torch.ones(B),
                           torch.zeros(B, dtype=torch.long), draft_probs=draft.probs, generator=g)
    return float(result.accepted_lens.sum()) / (B * DRAFT)


def test_captured_features_are_the_toy_targets_embeddings(toy):
    decoder = toy.decoder()
    cfg = DrafterConfig(**CONFIG)
    buffer = FeatureBuffer(cfg, toy.hidden)
    toy.engine(decoder, buffer).generate(toy.requests(num_prompts=2, samples=2, max_tokens=8, seed=0))
    batch = buffer.sample(torch.Generator().manual_seed(0))
    v = batch.valid
    assert torch.allclose(batch.features[v], decoder.embed.weight[batch.features[v].matmul(
        decoder.embed.weight.T).argmax(-1)], atol=1e-5)
    # the target feature is the embedding of the token paired with the input feature
    assert torch.allclose(batch.target_features[v], decoder.embed.weight[batch.next_tokens[v]], atol=1e-5)


def test_drafter_learns_the_toy_target_exactly(toy):
    decoder, drafter, loss = _train(toy)
    assert loss < 0.01
    assert _acceptance(toy, decoder, drafter) > 0.95


def test_an_off_by_one_pairing_fails_the_same_test(toy, monkeypatch):
    def shifted(rows, tokens, run_ids):  # pairs (h_t, x_t) instead of (h_t, x_{t+1})
        same = run_ids[1:] == run_ids[:-1]
        return rows[:-1][same], tokens[:-1][same], rows[1:][same], run_ids[:-1][same]

    monkeypatch.setattr(feature_buffer, "aligned_pairs", shifted)
    decoder, drafter, loss = _train(toy)
    assert loss > 0.1
    assert _acceptance(toy, decoder, drafter) < 0.8
