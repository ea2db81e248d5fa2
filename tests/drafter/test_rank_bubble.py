"""Bubble coordination through the torch.distributed store with two gloo processes.

Rank 0 finishes its "rollout" at once and trains while rank 1 still generates (sleeps); rank 1
finishes later and finds every rank done, so it does not train. Afterwards both hold the same
weights: rank 0's trained ones (the update is weighted by optimizer steps, and rank 1 took none).
Then both ranks move their weights by different amounts in different step counts, and the
average is the step-weighted one. Last, the same processes join a TCP store as under torchrun
(`RankBubble.from_env`).
"""

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
GENERATE_S = 1.5  # rank 1's rollout


def _env_part(rank: int, port: int, out: str) -> None:
    """RankBubble.from_env: a client of the job's TCP store, as under torchrun."""
    from slipstream.drafter import RankBubble

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=WORLD)
    try:
        bubble = RankBubble.from_env()
        assert (bubble.rank, bubble.world_size) == (rank, WORLD)
        if rank == 1:
            time.sleep(1.0)
        bubble.mark_done(step=7)
        seen = bubble.done_count(7)
        while bubble.done_count(7) < WORLD:
            time.sleep(0.01)
        dist.barrier()
        torch.save({"seen": seen, "missing": bubble.missing_ranks(7)}, os.path.join(out, f"env{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _worker(rank: int, tmp: str, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from slipstream.drafter import (BubbleTrainer, Drafter, DrafterConfig, DrafterSlot, FeatureBuffer, RankBubble,
                                    TargetHead, broadcast_drafter)
    from slipstream.rollout.model_runner import StepFeatures
    from tests.drafter.random_target import random_target

    store = dist.FileStore(os.path.join(tmp, "store"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        V, H = 16, 16
        c, target = random_target(V, H, heads=2, kv_heads=2)
        cfg = DrafterConfig(batch_tokens=32, seq_len=16, slice_steps=2, window=8, seed=rank)
        torch.manual_seed(100 + rank)  # different initial weights: the broadcast must equalise them
        drafter = Drafter(c, TargetHead.from_decoder(target), cfg)
        broadcast_drafter(drafter)
        initial = {k: v.clone() for k, v in drafter.state_dict().items()}
        buffer = FeatureBuffer(cfg, H)
        gen = torch.Generator().manual_seed(rank)
        buffer(StepFeatures([(f"r{rank}", 0)], torch.zeros(30, dtype=torch.long), torch.arange(30),
                            torch.randint(V, (30,), generator=gen), {-1: torch.randn(30, H, generator=gen)}))
        trainer = BubbleTrainer(drafter, buffer, DrafterSlot(drafter))
        if rank == 1:
            time.sleep(GENERATE_S)
        bubble = RankBubble(dist.PrefixStore("test", store), rank, WORLD)
        before_average = {}
        import slipstream.drafter.bubble_trainer as bt

        average = bt.average_drafter

        def spy(d, start, steps, group=None):
            before_average.update({k: v.clone() for k, v in d.state_dict().items()})
            average(d, start, steps, group)

        bt.average_drafter = spy
        report = bubble.run(trainer, step=0)
        after = {k: v.clone() for k, v in drafter.state_dict().items()}
        # Both ranks trained: rank r moved every weight by r + 1 in r + 1 steps.
        with torch.no_grad():
            for p in drafter.parameters():
                p.add_(rank + 1.0)
        average(drafter, after, steps=rank + 1)
        torch.save({"report": report, "initial": initial, "before": before_average, "after": after,
                    "served": trainer.slot.state_dict(), "version": trainer.slot.version,
                    "weighted": drafter.state_dict()}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    _env_part(rank, port, tmp)


def test_ranks_done_early_train_and_end_with_equal_weights(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(str(tmp_path), port), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["report"].steps > 0 and r0["report"].kind == "rank_idle"
    assert r0["report"].available_s >= GENERATE_S * 0.5
    assert r1["report"].steps == 0
    for k in r0["initial"]:
        assert torch.equal(r0["initial"][k], r1["initial"][k]), k  # broadcast at the start
        assert torch.equal(r0["after"][k], r1["after"][k]), k  # averaged at the end
        assert torch.allclose(r0["after"][k], r0["before"][k], atol=1e-6), k  # = rank 0's update
        assert torch.equal(r0["served"][k], r0["after"][k]), k  # published to the drafts
    assert not all(torch.equal(r0["after"][k], r0["initial"][k]) for k in r0["initial"])
    assert r0["version"] == r1["version"] == 1
    for k in r0["after"]:  # (1 * 1 + 2 * 2) / (1 + 2)
        assert torch.allclose(r0["weighted"][k], r0["after"][k] + 5 / 3, atol=1e-5), k
        assert torch.equal(r0["weighted"][k], r1["weighted"][k]), k
    e0, e1 = (torch.load(tmp_path / f"env{r}.pt") for r in range(WORLD))
    assert e0["seen"] == 1 and e1["seen"] == 2  # from_env: rank 1 marked done after rank 0
    assert e0["missing"] == e1["missing"] == []
