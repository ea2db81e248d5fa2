"""Preemptible training: slices stop at the flag or the deadline, reward-time training ends with
the work, the trainer state round-trips, and the side-stream gate follows the measured slowdown."""

import threading
import time

import pytest
import torch

from slipstream.drafter import (BubbleTrainer, Drafter, DrafterConfig, DrafterSlot, FeatureBuffer, SideStreamTrainer,
                                SlowdownGate, TargetHead)
from slipstream.rollout.model_runner import StepFeatures
from tests.drafter.random_target import random_target

V, H = 16, 16


def _trainer(fill=True, **kw) -> BubbleTrainer:
    c, target = random_target(V, H, heads=2, kv_heads=2)
    cfg = DrafterConfig(**{"batch_tokens": 64, "seq_len": 32, "slice_steps": 2, "window": 8, **kw})
    buffer = FeatureBuffer(cfg, H)
    if fill:
        n, g = 40, torch.Generator().manual_seed(1)
        buffer(StepFeatures([("r0", 0), ("r0", 1)], torch.arange(2 * n) // n, torch.arange(2 * n) % n,
                            torch.randint(V, (2 * n,), generator=g), {-1: torch.randn(2 * n, H, generator=g)}))
    torch.manual_seed(0)
    drafter = Drafter(c, TargetHead.from_decoder(target), cfg)
    return BubbleTrainer(drafter, buffer, DrafterSlot(drafter))


def test_a_deadline_preempts_between_slices():
    t = _trainer()
    start = time.perf_counter()
    report = t.train_until(deadline=start + 0.5)
    end = time.perf_counter()
    assert report.steps > 0 and report.steps % 2 == 0  # whole slices only
    assert report.used_s <= report.available_s
    # It never starts a slice it expects to overrun the deadline with.
    assert end - start < 0.5 + 0.5


def test_a_stop_flag_ends_training_within_a_slice():
    t = _trainer()
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    report = t.train_until(stop=stop.is_set)
    assert report.steps > 0 and report.available_s >= 0.3
    per_slice = report.used_s / (report.steps / 2)
    assert report.available_s < 0.3 + per_slice + 0.5


def test_an_empty_buffer_waits_for_the_stop_without_training():
    t = _trainer(fill=False)
    report = t.train_until(deadline=time.perf_counter() + 0.2)
    assert report.steps == 0 and report.used_s == 0 and report.available_s >= 0.15
    assert t.train_until(max_steps=5).steps == 0  # only a step budget: returns at once


def test_training_while_rewards_are_computed_ends_with_them():
    t = _trainer()
    value, report = t.train_while(lambda: (time.sleep(0.4), 42)[1])
    assert value == 42 and report.kind == "reward" and report.steps > 0 and report.available_s >= 0.3

    def broken():
        raise RuntimeError("verifier crashed")

    with pytest.raises(RuntimeError, match="verifier crashed"):
        t.train_while(broken)


def test_state_round_trips_and_training_continues_identically():
    a = _trainer()
    a.train_until(max_steps=3)
    state = a.state_dict()
    b = _trainer()
    b.load_state_dict(state)
    assert b.slot.version == 1  # loading publishes the restored weights to the drafts
    a.train_until(max_steps=2)
    b.train_until(max_steps=2)
    for (k, x), (_, y) in zip(a.drafter.state_dict().items(), b.drafter.state_dict().items()):
        assert torch.equal(x, y), k
    assert a.steps == b.steps == 5


def test_publish_and_metrics():
    t = _trainer(buffer_max_age=5)  # rows of step 0 are still used at step 3
    t.buffer.set_step(3)
    t.train_until(max_steps=4, kind="rank_idle")
    assert t.publish() == 1
    m = t.log(current_step=3)
    assert m["drafter/version"] == 1.0
    assert m["drafter/train_steps"] == 4.0
    assert m["drafter/data_staleness"] == 3.0 and m["drafter/weights_staleness"] == 3.0
    assert m["drafter/bubble_rank_idle_steps"] == 4.0
    assert 0 < m["drafter/bubble_used_s"] <= m["drafter/bubble_available_s"]
    assert m["drafter/loss"] > 0
    t.metrics.record_verify("drafter", [4, 4, 0], [4, 1, 0])
    m = t.log(current_step=4)
    assert m["spec/drafter/acceptance_len"] == 2.5 and m["spec/drafter/acceptance_rate"] == 5 / 8
    assert "drafter/loss" not in m  # a new step starts empty


def _gate_run(gate: SlowdownGate, slowdown: float, steps: int, live_batch: int = 4) -> list[bool]:
    """Decode periods of 10 ms, `slowdown` longer when training ran; returns the gate's decisions."""
    decisions = []
    for _ in range(steps):
        train = gate.wants_training(live_batch)
        decisions.append(train)
        gate.record(live_batch, 0.010 * (1 + slowdown * train), train)
    return decisions


def test_gate_enables_training_only_below_the_slowdown_bound():
    cheap = SlowdownGate(max_slowdown=0.05, max_batch=8, probe_steps=4, reprobe_steps=50)
    d = _gate_run(cheap, 0.03, 40)
    assert d[:4] == [False] * 4 and d[4:8] == [True] * 4  # measure without, then with
    assert all(d[8:]) and cheap.slowdown(4) == pytest.approx(0.03)
    costly = SlowdownGate(max_slowdown=0.05, max_batch=8, probe_steps=4, reprobe_steps=50)
    d = _gate_run(costly, 0.10, 40)
    assert not any(d[8:]) and costly.slowdown(4) == pytest.approx(0.10)
    assert not cheap.wants_training(16)  # above max_batch: never


def test_gate_turns_off_when_training_starts_to_cost_more_and_reprobes_later():
    gate = SlowdownGate(max_slowdown=0.05, max_batch=8, probe_steps=4, reprobe_steps=30)
    _gate_run(gate, 0.02, 12)
    assert gate.wants_training(4)
    d = _gate_run(gate, 0.20, 6)  # the decode step got cheaper relative to training
    assert d[0] and not d[-1]
    d = _gate_run(gate, 0.02, 40)  # after reprobe_steps it measures again and re-enables
    assert not d[0] and d[-1]


def test_side_stream_trainer_trains_only_while_the_gate_allows():
    clock = [0.0]
    t = _trainer()
    t.clock = lambda: clock[0]
    side = SideStreamTrainer(t, SlowdownGate(max_slowdown=0.05, max_batch=8, probe_steps=3, reprobe_steps=1000))
    trained = []
    for step in range(20):
        live = 16 if step < 4 else 2  # large batch first: no training at all
        did = side.on_step(live)
        trained.append(did)
        clock[0] += 0.010 * (1.02 if did else 1.0)
    assert not any(trained[:4]) and not any(trained[4:7]) and all(trained[7:])
    report = side.end_rollout()
    assert report.kind == "side_stream" and report.steps == t.steps == sum(trained)
    assert t.slot.version == 1


def test_training_works_from_inside_inference_mode():
    t = _trainer()
    before = {k: v.clone() for k, v in t.drafter.state_dict().items()}
    with torch.inference_mode():  # as from the engine's decode loop
        assert t.train_step()
    assert any(not torch.equal(before[k], v) for k, v in t.drafter.state_dict().items())


def test_a_rank_that_never_finishes_is_named(tmp_path):
    import torch.distributed as dist

    from slipstream.drafter.bubble_trainer import BubbleTimeout, RankBubble

    store = dist.FileStore(str(tmp_path / "store"), 1)
    bubble = RankBubble(store, rank=0, world_size=3, timeout_s=0.3)
    RankBubble(store, rank=2, world_size=3).mark_done(step=4)
    with pytest.raises(BubbleTimeout, match=r"rank 0: ranks \[1\] did not finish the rollout of step 4"):
        bubble.run(_trainer(), step=4)


def test_the_loss_reads_features_as_the_head_does():
    """Scaling the true next features (as a residual stream of another magnitude would) changes
    neither part of the loss: both compare what the target's final norm makes of them."""
    from slipstream.drafter.bubble_trainer import drafter_loss

    trainer = _trainer()
    batch = trainer.buffer.sample(torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, base = drafter_loss(trainer.drafter, batch)
        batch.target_features = batch.target_features * 40.0
        _, scaled = drafter_loss(trainer.drafter, batch)
    assert float(base["feature_loss"]) > 0.01  # the untrained drafter is far from the targets
    assert torch.allclose(scaled["feature_loss"], base["feature_loss"], rtol=1e-4)
    assert torch.allclose(scaled["token_kl"], base["token_kl"], rtol=1e-4)


def test_expected_acceptance_is_what_verification_accepts():
    # The metric claims to be the probability that lossless verification accepts a first draft
    # token drawn from the drafter's q against the target's p: draw such tokens and verify them.
    from slipstream.drafter.bubble_trainer import expected_acceptance
    from slipstream.rollout.spec.verify import verify_drafts

    t = _trainer()
    batch = t.buffer.sample(torch.Generator().manual_seed(0))
    value = expected_acceptance(t.drafter, batch, rows_per_chunk=7)  # chunks that do not divide the rows
    assert 0.0 < value < 1.0
    with torch.no_grad():
        head, v = t.drafter.head, batch.valid
        predicted = t.drafter(batch.features, batch.next_tokens, batch.positions, batch.segment_ids)[v]
        q = head.read(head.normed(predicted)).float().softmax(-1)
        target_logits = head.read(head.normed(batch.target_features[v])).float()
    draws = 400
    g = torch.Generator().manual_seed(1)
    tokens = torch.multinomial(q, draws, replacement=True, generator=g).T.reshape(-1, 1)  # [draws * rows, 1]
    S = tokens.shape[0]
    logits = target_logits.repeat(draws, 1)[:, None].expand(S, 2, V)
    ones = torch.ones(S)
    result = verify_drafts(logits, tokens, torch.ones(S, dtype=torch.long), ones, ones, torch.zeros(S, dtype=torch.long),
                           draft_probs=q.repeat(draws, 1)[:, None], generator=g)
    accepted = result.accepted_lens.float().mean().item()
    sigma = (value * (1 - value) / S) ** 0.5
    assert abs(accepted - value) < 4 * sigma + 1e-3, (accepted, value)


def test_the_rollout_acceptance_is_logged_and_reads_only_its_step():
    t = _trainer()
    assert t.rollout_acceptance(step=3) is None  # the buffer holds step 0 only
    value = t.rollout_acceptance(step=0)
    assert value is not None and t.log(0)["drafter/rollout_accept"] == value
    assert "drafter/rollout_accept" not in t.log(1)  # a step's metrics start empty
