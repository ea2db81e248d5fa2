"""Preemptible drafter training in the idle bubbles of an RL step.

`BubbleTrainer` trains in slices of `slice_steps` optimizer steps and checks its stop condition
(a flag, a deadline) between slices, so a bubble is given back within about one slice. It serves
three kinds of bubbles:

(a) `RankBubble`: under torchrun, a rank whose rollouts are done publishes "rollout done" in the
    torch.distributed store and trains until every rank has published it; then the ranks average
    their drafter weights with one all_reduce (each rank's update weighted by the optimizer steps
    it took, so a rank that finished last, with no time to train, does not dilute the others) and
    every rank ends with the same weights.
(b) `BubbleTrainer.train_while`: while other work runs (reward computation), train until it ends.
(c) `SideStreamTrainer`: on one GPU during the small-batch tail of a rollout, launch training
    steps on a side CUDA stream between decode steps, only while `SlowdownGate` measures that the
    decode loop slows down by less than `side_stream_max_slowdown` (5%).

New weights reach the drafts through `DrafterSlot.publish` (double buffer, version counter).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from slipstream.drafter.feature_buffer import DrafterBatch, FeatureBuffer
from slipstream.drafter.metrics import BubbleReport, DrafterMetrics
from slipstream.drafter.model import Drafter
from slipstream.drafter.swap import DrafterSlot

__all__ = ["BubbleTimeout", "BubbleTrainer", "RankBubble", "SideStreamTrainer", "SlowdownGate", "average_drafter",
           "broadcast_drafter", "drafter_loss", "expected_acceptance"]

T = TypeVar("T")


def drafter_loss(drafter: Drafter, batch: DrafterBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted SmoothL1 on the predicted next feature plus KL(target || drafter) of the next
    token's distribution, over the batch's valid rows. Stats are detached tensors (no host sync).

    The features are compared after the target's final norm. The drafter's output is only ever read
    through a norm (the head's, or its own input norm when a draft chains), so its scale carries
    nothing; the raw residual stream does (values of 15 and more in SmolLM2's last layer), and a
    loss on it mostly measured that scale.
    """
    cfg = drafter.config
    predicted = drafter(batch.features, batch.next_tokens, batch.positions, batch.segment_ids)
    valid = batch.valid
    predicted = predicted[valid]
    target = batch.target_features[valid].to(predicted.dtype)
    head = drafter.head
    predicted, target = head.normed(predicted), head.normed(target)  # normed once, for both terms
    feature_loss = F.smooth_l1_loss(predicted, target)
    with torch.no_grad():
        target_logp = head.read(target).log_softmax(-1)
    logq = head.read(predicted).log_softmax(-1)
    token_kl = (target_logp.exp() * (target_logp - logq)).sum(-1).mean()
    loss = cfg.feature_loss_weight * feature_loss + cfg.token_loss_weight * token_kl
    top1 = (logq.argmax(-1) == target_logp.argmax(-1)).float().mean()
    stats = {"loss": loss.detach(), "feature_loss": feature_loss.detach(), "token_kl": token_kl.detach(),
             "top1": top1}
    return loss, stats


def expected_acceptance(drafter: Drafter, batch: DrafterBatch, rows_per_chunk: int = 256) -> float:
    """Mean over the batch's valid rows of sum_x min(p(x), q(x)), p the target's next-token
    distribution and q the drafter's (both at temperature 1, untruncated): the probability that
    lossless speculative sampling accepts a first draft token drawn from q, given the target's
    own features as context. Unlike acceptance measured in the engine it does not depend on what
    the policies chose to draft, so drafters compare on the same data. One host read."""
    with torch.inference_mode():
        predicted = drafter(batch.features, batch.next_tokens, batch.positions, batch.segment_ids)
        valid = batch.valid
        predicted, target = predicted[valid], batch.target_features[valid].to(predicted.dtype)
        head, total = drafter.head, predicted.new_zeros((), dtype=torch.float32)
        for i in range(0, predicted.shape[0], rows_per_chunk):  # [rows, vocab] twice, a chunk at a time
            q = head.read(head.normed(predicted[i:i + rows_per_chunk])).float().softmax(-1)
            p = head.read(head.normed(target[i:i + rows_per_chunk])).float().softmax(-1)
            total += torch.minimum(p, q).sum()
        return float(total) / max(predicted.shape[0], 1)


class BubbleTrainer:
    """Trains `drafter` (its own copy, not the one drafts use) on `buffer`; publishes into `slot`."""

    def __init__(self, drafter: Drafter, buffer: FeatureBuffer, slot: DrafterSlot | None = None,
                 metrics: DrafterMetrics | None = None, clock: Callable[[], float] = time.perf_counter):
        self.drafter = drafter
        self.buffer = buffer
        self.slot = slot
        self.metrics = metrics if metrics is not None else DrafterMetrics()
        self.clock = clock
        cfg = self.config = drafter.config
        self.optimizer = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # draws the batches' pieces
        self.eval_generator = torch.Generator().manual_seed(cfg.seed + 1)  # and the evaluations' (apart)
        self.steps = 0
        self.newest_data_step: int | None = None
        self.last_stats: dict[str, torch.Tensor] = {}  # the latest step's loss terms (device tensors)

    def train_step(self, refresh: bool = True) -> bool:
        """One optimizer step on a fresh batch; False (and nothing done) while the buffer holds no pair.
        refresh=False: draw from the pairs indexed before (see `FeatureBuffer.sample`)."""
        # Callers may sit inside the engine's inference mode or a no-grad block (the decode loop).
        with torch.inference_mode(False), torch.enable_grad():
            batch = self.buffer.sample(self.generator, device=self.drafter.device, refresh=refresh)
            if batch is None:
                return False
            self.drafter.train()
            loss, stats = drafter_loss(self.drafter, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
        self.steps += 1
        self.newest_data_step = max(batch.newest_step, self.newest_data_step or batch.newest_step)
        self.metrics.record_train(stats, batch.mean_step)
        self.last_stats = stats
        return True

    def rollout_acceptance(self, step: int) -> float | None:
        """`expected_acceptance` of the drafter on a batch of RL step `step`'s rollout (None while
        the buffer holds none of it); logged as drafter/rollout_accept. Called after the rollout
        and before the bubbles that train on it, it measures how well the drafter predicts the
        policy it has not yet trained on (the side stream may have trained on the rollout's tail)."""
        batch = self.buffer.sample(self.eval_generator, device=self.drafter.device, step=step)
        if batch is None:
            return None
        value = expected_acceptance(self.drafter, batch)
        self.metrics.record_rollout_acceptance(value)
        return value

    def train_slice(self, limit: int | None = None) -> int:
        """Up to `slice_steps` (and `limit`) optimizer steps; returns how many ran (0: no data)."""
        done, n = 0, min(self.config.slice_steps, limit if limit is not None else self.config.slice_steps)
        while done < n and self.train_step():
            done += 1
        if done and self.drafter.device.type == "cuda":
            torch.cuda.current_stream(self.drafter.device).synchronize()  # a slice's time is its real time
        return done

    def train_until(self, stop: Callable[[], bool] | None = None, deadline: float | None = None,
                    max_steps: int | None = None, kind: str = "bubble", poll_s: float = 0.002) -> BubbleReport:
        """Train slice after slice until `stop()` is true, the next slice would end after
        `deadline` (on `clock`), or `max_steps` steps ran. While the buffer is empty it waits
        (polling `stop` every `poll_s`) rather than returning, unless only `max_steps` was given."""
        if stop is None and deadline is None and max_steps is None:
            raise ValueError("train_until needs a stop condition, a deadline or max_steps")
        start = self.clock()
        used, steps0, last_slice = 0.0, self.steps, 0.0
        while True:
            if stop is not None and stop():
                break
            now = self.clock()
            if deadline is not None and now + last_slice > deadline:
                break
            if max_steps is not None and self.steps - steps0 >= max_steps:
                break
            if self.train_slice(None if max_steps is None else max_steps - (self.steps - steps0)) == 0:
                if stop is None and deadline is None:
                    break
                time.sleep(poll_s)
                continue
            last_slice = self.clock() - now
            used += last_slice
        report = BubbleReport(kind, self.clock() - start, used, self.steps - steps0)
        self.metrics.record_bubble(report)
        return report

    def train_while(self, work: Callable[[], T], kind: str = "reward") -> tuple[T, BubbleReport]:
        """Run `work` in a thread and train until it returns; returns its result and the bubble.
        An exception in `work` is raised here after training stops."""
        result: dict[str, Any] = {}

        def run():
            try:
                result["value"] = work()
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e

        thread = threading.Thread(target=run, name=f"drafter-bubble-{kind}", daemon=True)
        thread.start()
        report = self.train_until(stop=lambda: not thread.is_alive(), kind=kind)
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"], report

    def publish(self) -> int | None:
        """Swap the trained weights into the slot drafts use; returns the new version (None: no slot)."""
        if self.slot is None:
            return None
        return self.slot.publish(self.drafter.state_dict())

    def log(self, current_step: int) -> dict[str, float]:
        """The step's drafter metrics (see `DrafterMetrics`), then reset for the next step."""
        version = self.slot.version if self.slot is not None else None
        return self.metrics.as_dict(current_step, self.newest_data_step, version)

    def state_dict(self) -> dict[str, Any]:
        """Trainable weights, optimizer state and counters, for the run's checkpoint (copies: training
        on afterwards does not change them)."""
        return {"drafter": {k: v.clone() for k, v in self.drafter.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "steps": self.steps, "newest_data_step": self.newest_data_step,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.drafter.load_state_dict(state["drafter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.newest_data_step = state["newest_data_step"]
        self.generator.set_state(state["generator"])
        self.publish()


# ---------------------------------------------------------------------------------------------
# (a) ranks done early, coordinated through the torch.distributed store


class BubbleTimeout(RuntimeError):
    """Other ranks never reported their rollout done."""


@torch.no_grad()
def broadcast_drafter(drafter: Drafter, src: int = 0, group=None) -> None:
    """Give every rank `src`'s drafter weights (once, before the first bubble)."""
    for p in drafter.parameters():
        dist.broadcast(p.data, src=src, group=group)


@torch.no_grad()
def average_drafter(drafter: Drafter, start: Mapping[str, torch.Tensor], steps: int, group=None) -> None:
    """Make every rank's weights start_mean + sum_r steps_r (w_r - start_r) / sum_r steps_r.

    `start`: this rank's weights when its bubble began; `steps`: optimizer steps it took since.
    With no step anywhere the weights become the mean of the starts (equal ranks stay as they are).
    One all_reduce of [starts ; weighted updates ; steps].
    """
    names = [n for n, _ in drafter.named_parameters()]
    params = [p for _, p in drafter.named_parameters()]
    now = torch.cat([p.detach().reshape(-1) for p in params])
    begin = torch.cat([start[n].reshape(-1).to(now) for n in names])
    N = now.numel()
    buf = torch.cat([begin, (now - begin) * steps, now.new_tensor([float(steps)])])
    dist.all_reduce(buf, group=group)
    total = buf[-1]
    new = buf[:N] / dist.get_world_size(group)
    if total > 0:
        new = new + buf[N:2 * N] / total
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(new[offset:offset + n].view_as(p))
        offset += n


class RankBubble:
    """Bubble (a): train while other ranks still generate; see the module docstring.

    store: a torch.distributed store shared by the ranks (`dist.TCPStore`, `dist.FileStore`, or a
    `dist.PrefixStore` over either); keys live under `prefix`/<step>. A rank that waits longer than
    `timeout_s` for the others raises `BubbleTimeout` naming the ranks that never finished.
    """

    def __init__(self, store, rank: int, world_size: int, group=None, prefix: str = "slipstream/drafter",
                 timeout_s: float = 1800.0):
        self.store, self.rank, self.world_size, self.group, self.prefix = store, rank, world_size, group, prefix
        self.timeout_s = timeout_s

    @classmethod
    def from_env(cls, group=None, prefix: str = "slipstream/drafter", timeout_s: float = 1800.0) -> "RankBubble":
        """Under torchrun (an initialised process group, MASTER_ADDR and MASTER_PORT set): a client
        of the job's TCP store, with this rank and the group's size."""
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing or not dist.is_initialized():
            raise RuntimeError(f"RankBubble.from_env needs torchrun's environment and an initialised process "
                               f"group (missing: {', '.join(missing) or 'init_process_group'})")
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        return cls(store, dist.get_rank(group), dist.get_world_size(group), group, prefix, timeout_s)

    def _key(self, step: int) -> str:
        return f"{self.prefix}/{step}/rollout_done"

    def mark_done(self, step: int) -> None:
        """Tell the other ranks this rank's rollout of `step` is done."""
        self.store.set(f"{self._key(step)}/{self.rank}", "1")  # who, for the timeout message
        self.store.add(self._key(step), 1)

    def missing_ranks(self, step: int) -> list[int]:
        """Ranks that have not marked `step` done."""
        return [r for r in range(self.world_size) if not self.store.check([f"{self._key(step)}/{r}"])]

    def done_count(self, step: int) -> int:
        """Ranks whose rollout of `step` is done."""
        return int(self.store.add(self._key(step), 0))

    def run(self, trainer: BubbleTrainer, step: int) -> BubbleReport:
        """Mark this rank done, train until every rank is, average the weights, publish them.
        Every rank of the group must call it for `step` (it ends with a collective)."""
        start = {n: p.detach().clone() for n, p in trainer.drafter.named_parameters()}
        self.mark_done(step)
        deadline = time.monotonic() + self.timeout_s

        def stop() -> bool:
            if self.done_count(step) >= self.world_size:
                return True
            if time.monotonic() > deadline:
                raise BubbleTimeout(f"rank {self.rank}: ranks {self.missing_ranks(step)} did not finish the "
                                    f"rollout of step {step} within {self.timeout_s:.0f} s")
            return False

        report = trainer.train_until(stop=stop, kind="rank_idle")
        average_drafter(trainer.drafter, start, report.steps, self.group)
        trainer.publish()
        return report


# ---------------------------------------------------------------------------------------------
# (c) a side stream during the small-batch tail, gated by the measured slowdown


@dataclass
class _Bucket:
    phase: str = "probe_off"  # probe_off -> probe_on -> decided (-> probe_off after reprobe_steps)
    off: list[float] = field(default_factory=list)
    on: list[float] = field(default_factory=list)
    enabled: bool = False
    since: int = 0
    slowdown: float | None = None


class SlowdownGate:
    """Allows side-stream training at a live batch size only while it measurably costs < max_slowdown.

    Per live-batch bucket (powers of two up to `max_batch`): measure `probe_steps` decode periods
    without training, then `probe_steps` with, and enable training iff median(with) /
    median(without) - 1 < max_slowdown. After `reprobe_steps` steps it measures again; while
    enabled, the median of the last `probe_steps` periods with training is checked against the
    same bound every step, and training stops at once if it is exceeded.
    """

    def __init__(self, max_slowdown: float = 0.05, max_batch: int = 8, probe_steps: int = 8,
                 reprobe_steps: int = 256):
        if not 0 < max_slowdown < 1 or max_batch < 1 or probe_steps < 1 or reprobe_steps < 1:
            raise ValueError("SlowdownGate needs 0 < max_slowdown < 1 and max_batch, probe_steps, "
                             f"reprobe_steps >= 1, got {max_slowdown}, {max_batch}, {probe_steps}, {reprobe_steps}")
        self.max_slowdown, self.max_batch = max_slowdown, max_batch
        self.probe_steps, self.reprobe_steps = probe_steps, reprobe_steps
        self._buckets: dict[int, _Bucket] = {}

    def _bucket(self, live_batch: int) -> _Bucket | None:
        if not 0 < live_batch <= self.max_batch:
            return None
        return self._buckets.setdefault(1 << (live_batch - 1).bit_length(), _Bucket())

    def wants_training(self, live_batch: int) -> bool:
        b = self._bucket(live_batch)
        if b is None:
            return False
        return b.phase == "probe_on" or (b.phase == "decided" and b.enabled)

    def slowdown(self, live_batch: int) -> float | None:
        """The last measured slowdown at this live batch size (None: not measured yet)."""
        b = self._bucket(live_batch)
        return None if b is None else b.slowdown

    def record(self, live_batch: int, seconds: float, trained: bool) -> None:
        """One decode period at `live_batch`, with or without a training step launched in it."""
        b = self._bucket(live_batch)
        if b is None:
            return
        n = self.probe_steps
        if b.phase == "probe_off" and not trained:
            b.off.append(seconds)
            if len(b.off) >= n:
                b.phase = "probe_on"
        elif b.phase == "probe_on" and trained:
            b.on.append(seconds)
            if len(b.on) >= n:
                self._decide(b, b.on)
                b.phase, b.since = "decided", 0
        elif b.phase == "decided":
            b.since += 1
            if b.enabled and trained:
                b.on = (b.on + [seconds])[-n:]
                self._decide(b, b.on)
            if b.since >= self.reprobe_steps:
                b.phase, b.off, b.on = "probe_off", [], []

    def _decide(self, b: _Bucket, on: list[float]) -> None:
        b.slowdown = statistics.median(on) / statistics.median(b.off) - 1.0
        b.enabled = b.slowdown < self.max_slowdown


class SideStreamTrainer:
    """Bubble (c): call `on_step(live_batch)` once per decode step of the engine's loop.

    It records the period since the previous call (one decode step plus the training launched in
    it) with the gate, then launches one training step on a side CUDA stream if the gate allows;
    the step's kernels overlap the next decode step. On CPU the step runs inline.
    """

    def __init__(self, trainer: BubbleTrainer, gate: SlowdownGate | None = None):
        cfg = trainer.config
        self.trainer = trainer
        self.gate = gate or SlowdownGate(cfg.side_stream_max_slowdown, cfg.side_stream_max_batch,
                                         cfg.side_stream_probe_steps, cfg.side_stream_reprobe_steps)
        device = trainer.drafter.device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._last: tuple[float, int, bool] | None = None  # (time, live batch, trained) of the previous call
        self._started: float | None = None
        self._used = 0.0
        self._steps = 0

    def on_step(self, live_batch: int) -> bool:
        """Returns whether a training step was launched."""
        now = self.trainer.clock()
        if self._started is None:
            self._started = now
        if self._last is not None:
            then, batch, trained = self._last
            self.gate.record(batch, now - then, trained)
        trained = False
        if self.gate.wants_training(live_batch):
            launch = self.trainer.clock()
            if self.stream is not None:
                # The step reads rows the decode stream wrote; the decode stream goes on meanwhile.
                self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                # The engine writes features every step: re-indexing them each time would cost
                # host syncs in the decode loop, so the step draws from the pairs indexed before.
                trained = self.trainer.train_step(refresh=False)
            self._used += self.trainer.clock() - launch
            self._steps += int(trained)
        self._last = (now, live_batch, trained)
        return trained

    def end_rollout(self) -> BubbleReport:
        """Close the rollout's side-stream bubble: make the trained weights visible to the decode
        stream, publish them, and report (available: the rollout's span; used: host time in training
        launches, the part of the work the decode loop could have felt)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        now = self.trainer.clock()
        report = BubbleReport("side_stream", now - self._started if self._started is not None else 0.0,
                              self._used, self._steps)
        self.trainer.metrics.record_bubble(report)
        if self._steps:
            self.trainer.publish()
        self._last, self._started, self._used, self._steps = None, None, 0.0, 0
        return report
