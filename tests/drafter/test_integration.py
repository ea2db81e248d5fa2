"""The pieces in the order an engine's speculative loop and an RL step use them, on the toy target.

Rollouts fill the feature buffer, a bubble trains and publishes; then a speculative decode loop
drafts from the device-side context through the slot, verifies against the target, feeds the
kept tokens' features back, and logs acceptance; a second bubble publishes mid-loop, and the
drafts switch version between two steps, never inside one.
"""

import torch

from slipstream.drafter import (BubbleTrainer, ContextWindows, Drafter, DrafterConfig, DrafterSlot, FeatureBuffer,
                                TargetHead)
from slipstream.rollout.model_runner import StepFeatures
from slipstream.rollout.spec.verify import verify_drafts

K, B, ROUNDS = 4, 16, 10


def test_speculative_loop_with_online_drafter(toy):
    torch.manual_seed(0)
    decoder = toy.decoder()
    head = TargetHead.from_decoder(decoder)
    cfg = DrafterConfig(window=16, batch_tokens=256, seq_len=64, lr=1e-2, token_loss_weight=1.0)
    buffer = FeatureBuffer(cfg, toy.hidden)
    windows = ContextWindows(cfg.window, toy.hidden)

    def sink(sf):
        buffer(sf)
        windows(sf)

    # RL step 0: rollouts, then a bubble trains and publishes.
    toy.engine(decoder, sink).generate(toy.requests(num_prompts=8, samples=4, max_tokens=40, seed=0))
    drafter = Drafter(decoder.config, head, cfg)
    slot = DrafterSlot(drafter)
    trainer = BubbleTrainer(drafter, buffer, slot)
    trainer.train_until(max_steps=120, kind="rank_idle")
    assert trainer.publish() == 1
    windows.clear()

    # RL step 1: a speculative rollout. Each sequence starts from a fed prompt token.
    buffer.set_step(1)
    g = torch.Generator().manual_seed(1)
    keys = [(f"s{b}", 0) for b in range(B)]
    seqs = [torch.randint(toy.vocab, (2,), generator=g).tolist() for _ in range(B)]

    def feed(rows):  # the engine's capture of the kept positions: (seq index, position, token)
        owner = torch.tensor([b for b, _, _ in rows])
        tokens = torch.tensor([t for _, _, t in rows])
        sink(StepFeatures(keys, owner, torch.tensor([p for _, p, _ in rows]), tokens,
                          {-1: decoder.embed.weight[tokens]}))  # the toy's feature is the embedding

    feed([(b, 0, s[0]) for b, s in enumerate(seqs)])
    versions = []
    for r in range(ROUNDS):
        if r == ROUNDS // 2:  # a bubble elsewhere finishes: new weights between two steps
            trainer.train_until(max_steps=4)
            trainer.publish()
        last = torch.tensor([s[-1] for s in seqs])
        draft = slot.draft(windows.context(keys, last), K, torch.ones(B), generator=g)
        versions.append(draft.version)
        chain = torch.cat([last[:, None], draft.tokens], dim=1)
        res = verify_drafts(head.logits(decoder.embed.weight[chain]), draft.tokens, torch.full((B,), K),
                            torch.ones(B), torch.ones(B), torch.zeros(B, dtype=torch.long),
                            draft_probs=draft.probs, generator=g)
        trainer.metrics.record_verify("drafter", [K] * B, res.accepted_lens.tolist())
        rows = []
        for b, s in enumerate(seqs):
            emitted = res.output_tokens[b, :int(res.num_emitted[b])].tolist()
            fed = [s[-1]] + emitted[:-1]  # the last token and the kept drafts are fed; the new last is not
            rows += [(b, len(s) - 1 + i, t) for i, t in enumerate(fed)]
            s.extend(emitted)
        feed(rows)

    assert versions == [1] * (ROUNDS // 2) + [2] * (ROUNDS - ROUNDS // 2)
    for s in seqs:  # nothing the target could not have sampled
        assert all(b in toy.successors(a) for a, b in zip(s[1:], s[2:]))
    metrics = trainer.log(current_step=1)
    assert metrics["spec/drafter/acceptance_rate"] > 0.9
    assert metrics["spec/drafter/acceptance_len"] > 0.9 * K
    assert metrics["drafter/version"] == 2.0
    assert metrics["drafter/bubble_rank_idle_steps"] == 120
