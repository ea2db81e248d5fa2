"""The learned drafter of an RL run: what the RL loop calls, in the order it calls it.

`RunDrafter` holds the drafter's weights in a `DrafterSlot` the engine drafts from, the training
buffer the engine's feature capture fills (through `DraftingSpeculator`, which also keeps the
drafting context), and, when it trains online, the bubble trainer:

    engine = run_drafter.build_engine(decoder, eos, engine_config, seed, spec, sources)
    per RL step:  start_step(step) -> rollout -> evaluate_rollout(step) -> [rank_idle(step)] -> train_while(rewards)
                  -> train_after_rollout() -> publish() -> update -> log(step)
    checkpoints:  state_dict() / load_state_dict()

A frozen drafter (the warm start, never trained) only drafts; its state is its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from slipstream.drafter.bubble_trainer import BubbleTrainer, RankBubble, SideStreamTrainer
from slipstream.drafter.config import DrafterConfig
from slipstream.drafter.context import ContextWindows
from slipstream.drafter.engine_drafting import DraftingSpeculator
from slipstream.drafter.feature_buffer import FeatureBuffer
from slipstream.drafter.metrics import DrafterMetrics
from slipstream.drafter.model import Drafter, TargetHead
from slipstream.drafter.source_policy import SourcePolicyConfig
from slipstream.drafter.swap import DrafterSlot
from slipstream.drafter.warmup import load_drafter

__all__ = ["RunDrafter"]

T = TypeVar("T")


class RunDrafter:
    """See the module docstring. `decoder`: the engine's target (the drafter reads out through its
    embedding, norm and head, so weight syncs reach the drafter too); `online`: train in bubbles;
    `warm_start`: a drafter file (its model-shaping settings win over `config`); `side_stream`:
    train during the small-batch tail (on CUDA only); `rank_bubble`: train while other ranks
    still generate, weights averaged (under torchrun); `graph_batch`: drafts of up to that many
    sequences go through `DraftGraphs` (CUDA graphs of the chain; on CPU their static layout run
    eagerly, for tests); None: 32 on CUDA, 0 (always eager) on CPU."""

    def __init__(self, decoder, config: DrafterConfig, online: bool, warm_start: str | Path | None = None,
                 side_stream: bool = True, rank_bubble: RankBubble | None = None, max_seqs: int = 256,
                 graph_batch: int | None = None):
        device = decoder.embed.weight.device
        if warm_start is not None:
            drafter = load_drafter(warm_start, decoder, config, device=device)
        else:
            drafter = Drafter(decoder.config, TargetHead.from_decoder(decoder), config, device=device)
        self.config = config = drafter.config
        self.online = online
        self.drafter = drafter
        if graph_batch is None:
            graph_batch = 32 if device.type == "cuda" else 0
        self.slot = DrafterSlot(drafter, graph_batch)
        if graph_batch and device.type == "cuda":
            self.slot.capture_graphs()  # now, not in the middle of a rollout
        H = self.hidden_size = decoder.config.hidden_size
        self.device, self.max_seqs = device, max_seqs
        self.buffer = FeatureBuffer(config, H, decoder.embed.weight.dtype, device) if online else None
        self.trainer = BubbleTrainer(drafter, self.buffer, self.slot) if online else None
        self.metrics = self.trainer.metrics if online else DrafterMetrics()
        self.side_stream = SideStreamTrainer(self.trainer) if online and side_stream and device.type == "cuda" \
            else None
        self.rank_bubble = rank_bubble if online else None
        self.vocab_size = decoder.config.vocab_size

    # ---------------------------------------------------------------- the engine

    def speculator(self, spec, sources: SourcePolicyConfig, trains: bool = True) -> DraftingSpeculator:
        """An engine's speculator (and feature sink) over this drafter, with its own context
        windows; `spec`: a `SpecConfig`. `trains`: its rollouts feed the training buffer and the
        side stream (one engine per drafter should)."""
        c = self.config
        windows = ContextWindows(c.window, self.hidden_size, c.capture_layer, max_seqs=self.max_seqs,
                                 device=self.device)
        return DraftingSpeculator(spec, sources, self.slot, windows, self.vocab_size, c.max_draft_len,
                                  buffer=self.buffer if trains else None,
                                  side_stream=self.side_stream if trains else None)

    def build_engine(self, decoder, eos_token_ids, engine_config, seed: int, spec, sources: SourcePolicyConfig,
                     trains: bool = True):
        """A native engine that captures the drafter's feature layer and drafts with it."""
        from slipstream.rollout.engine import Engine

        speculator = self.speculator(spec, sources, trains)
        engine = Engine(decoder, eos_token_ids, engine_config, seed=seed, capture_layers=(self.config.capture_layer,),
                        feature_sink=speculator, speculator=speculator)
        speculator.generator = engine.runner.generator  # seeded rollouts draft reproducibly
        return engine

    # ---------------------------------------------------------------- one RL step

    def start_step(self, step: int) -> None:
        """Before the rollout of RL step `step`: its features are that step's data."""
        if self.buffer is not None:
            self.buffer.set_step(step)

    def evaluate_rollout(self, step: int) -> float | None:
        """Online: the drafter's expected acceptance on this step's rollout, before it trains on
        it (logged as drafter/rollout_accept); None for a frozen drafter (it keeps no rollouts)."""
        return self.trainer.rollout_acceptance(step) if self.trainer is not None else None

    def rank_idle(self, step: int) -> None:
        """Bubble (a), under torchrun: train until every rank's rollout is done, then average."""
        if self.rank_bubble is not None:
            self.rank_bubble.run(self.trainer, step)

    def train_while(self, work: Callable[[], T]) -> T:
        """Bubble (b): run `work` (the reward computation) while the drafter trains."""
        if self.trainer is None:
            return work()
        result, _ = self.trainer.train_while(work, kind="reward")
        return result

    def train_after_rollout(self, steps: int) -> None:
        """`steps` more optimizer steps between the rollout and the update (counted as a bubble
        of kind "after_rollout": the step pays for this time)."""
        if self.trainer is not None and steps > 0:
            self.trainer.train_until(max_steps=steps, kind="after_rollout")

    def publish(self) -> None:
        """Swap the trained weights into the slot the engine drafts from (between two rollouts)."""
        if self.trainer is not None and self.trainer.steps:
            self.trainer.publish()

    def log(self, step: int) -> dict[str, float]:
        """The step's drafter metrics: loss, bubbles available and used, staleness, weight version."""
        if self.trainer is not None:
            return self.trainer.log(step)
        return self.metrics.as_dict(step, None, self.slot.version)

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Trainable weights (and, online, the optimizer, counters and batch RNG)."""
        if self.trainer is not None:
            return {"online": True, "trainer": self.trainer.state_dict()}
        return {"online": False, "drafter": self.slot.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["online"]) != self.online:
            saved, here = ("online" if flag else "frozen" for flag in (state["online"], self.online))
            raise ValueError(f"the checkpoint holds a {saved} drafter, this run's is {here}")
        if self.trainer is not None:
            self.trainer.load_state_dict(state["trainer"])  # publishes into the slot
        else:
            with torch.no_grad():
                self.drafter.load_state_dict(state["drafter"])
            self.slot.publish(state["drafter"])
